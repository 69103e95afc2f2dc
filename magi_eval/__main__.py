from magi_eval.sweep import main

main()
