from huatuo_local.runtime.cli import main

main()
