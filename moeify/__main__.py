from moeify.cli import main

main()
