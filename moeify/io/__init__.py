"""Checkpoint I/O: the on-disk formats moeify writes and reads (`moeify.io.shards`: the
sharded safetensors format every writer and reader uses)."""
