"""Memory tiers of ZeRO-Infinity (§5-6): where model states live and how bytes move between tiers.

    nvme.py               the NVMe tier: preallocated swap files read and written asynchronously in aligned
                          blocks by a pool of I/O threads, with checksums (DeepNVMe, §6; DeepSpeed's ``aio``)
    optimizer_offload.py  the fp32 master and Adam moments in host memory or NVMe, stepped sub-group by
                          sub-group on the host (ZeRO-Offload; the infinity offload engine, §5)
    param_offload.py      stage 3's low-precision parameter chunks in host memory or NVMe, read ahead into a
                          pool of buffers (§5, §6.1 bandwidth-centric partitioning)
    transfer.py           host <-> device copies on a stream of their own, beside compute (§6.2)
    ledger.py             every transfer and compute interval, and the byte budget of each tier
"""
