from actsparse.cli import main

main()
