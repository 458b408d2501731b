"""The benchmarks behind `treepo bench ...`: engine, sampling (tree vs sequential), service and load.

Measurements only, kept apart from the engine, sampler and service code they measure.
"""
