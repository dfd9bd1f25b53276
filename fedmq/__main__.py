from fedmq.tools.cli import main

main()
