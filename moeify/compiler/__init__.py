"""The compiler: the plan records (`moeify.compiler.plan`), tracing
(`moeify.compiler.trace`), the program the passes share (`moeify.compiler.program`), the
pass pipelines (`moeify.compiler.pipeline`) and the report (`moeify.compiler.report`).
The passes themselves are `moeify.passes`."""
