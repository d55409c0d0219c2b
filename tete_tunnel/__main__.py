from tete_tunnel.cli import main

main()
