"""Reproduction studies: one module per study, each defining `STUDY` (a `moejax.study.Study`).

Run one with `python experiments/reproduce.py --study=NAME --workdir=DIR --data=...`.
"""
