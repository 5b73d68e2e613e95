"""facets.llm"""
