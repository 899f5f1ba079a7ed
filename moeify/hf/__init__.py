"""Hugging Face's own MoE classes as outputs: SwitchTransformers for T5 v1.0
(`moeify.hf.switch_transformers`) and the decoder-only targets Mixtral, Qwen2-MoE and
Qwen3-MoE (`moeify.hf.decoder_moe`, which also holds the table of which target fits
which source)."""
