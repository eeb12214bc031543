from ironsync.cli import main

main()
