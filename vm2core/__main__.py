from vm2core.cli import main

main()
