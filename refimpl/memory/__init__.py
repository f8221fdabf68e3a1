"""Memory tiers of ZeRO-Infinity (§5-6): where model states live and how bytes move between tiers.

    nvme.py   the NVMe tier: preallocated swap files read and written asynchronously in aligned blocks
              by a pool of I/O threads, with a manifest and checksums (DeepNVMe, §6; DeepSpeed's ``aio``)
"""
