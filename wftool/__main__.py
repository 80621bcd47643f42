from wftool.cli import main

main()
