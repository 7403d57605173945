from ds_realloc.cli import main

main()
