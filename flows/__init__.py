"""facets.flows"""
