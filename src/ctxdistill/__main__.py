from ctxdistill.cli import main

main()
