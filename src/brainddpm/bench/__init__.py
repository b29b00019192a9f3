"""Benchmarks that print their figures (`brainddpm bench`): the data path, training throughput through the
training engine beside the MONAI tutorial's step, evaluation and sampling. It sits after every stage and
may import any of them; no stage imports it.
"""
