from ltbench.cli import main

main()
