from zskd_lightning.cli import main

main()
