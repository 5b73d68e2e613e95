"""facets.tasks"""
