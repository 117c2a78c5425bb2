from reconciler.app.cli import main

main()
