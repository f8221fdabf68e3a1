"""ZeRO: partitioning model states across data-parallel ranks (Rajbhandari et al. 2020; ZeRO-Infinity §5).

flat.py  the flat, padded parameter buffer every stage partitions.
"""
