"""Classification: the cached classifier, its two cache tiers, the cluster's single flight, the
LLM rate limit, text normalisation, and the classifiers themselves (``classifiers/``).
"""
