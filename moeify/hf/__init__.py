"""Hugging Face's own MoE classes as outputs: SwitchTransformers for T5 v1.0
(`moeify.hf.switch_transformers`) and the decoder-only targets Mixtral and Qwen2-MoE
(`moeify.hf.decoder_moe`, which also holds the table of which target fits which source)."""
