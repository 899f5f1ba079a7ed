"""Graph-rewriting passes of moeify, installed as ``moeify.passes``."""
