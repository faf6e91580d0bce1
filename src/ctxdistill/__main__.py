from ctxdistill.cli import entry

entry()
