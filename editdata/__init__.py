"""editdata: the editing data sets, built offline from GeoNames, shared by the demo and the benchmarks.

- ``editdata.factcheck``: true/false claims "<city> is a city in <country>." with paraphrases;
- ``editdata.factcheck_model``: the MiniLM fact-checker fine-tuned on those claims (built once, cached);
- ``editdata.qa``: capital and country-of-city prompts with paraphrased prompts;
- ``editdata.geonames`` / ``editdata.hashing``: city selection, alternate names, data hashes.

Imports ``patcher`` at most among our packages; nothing heavy is imported at import time.
"""
