"""Memory tiers of ZeRO-Infinity (§5-6): where model states live and how bytes move between tiers.

    store.py              the tier interface (allocate, write, read, handles, free) and HostStore, host RAM
    mmap_store.py         the reference NVMe tier: numpy.memmap swap files, slice copies
    aio_store.py          the fast NVMe tier: aligned O_DIRECT requests on a pool of I/O threads, per-block
                          checksums (DeepNVMe, §6; DeepSpeed's ``aio``)
    swap_files.py         what the NVMe stores share: the locked swap folder, preallocated files, errors
    crc32.py              crc32 of a transfer from its blocks' crc32s
    optimizer_offload.py  the fp32 master and Adam moments in a store, stepped sub-group by sub-group on the
                          host (ZeRO-Offload; the infinity offload engine, §5)
    param_offload.py      stage 3's low-precision parameter chunks in a store, read ahead into a pool of
                          buffers (§5, §6.1 bandwidth-centric partitioning)
    transfer.py           host <-> device copies on a stream of their own, beside compute (§6.2)
    ledger.py             every transfer and compute interval, and the byte budget of each tier
"""
