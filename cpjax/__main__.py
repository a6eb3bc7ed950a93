from cpjax.cli import main

main()
