"""`python -m softcache` is the `softcache` command."""
from softcache.cli import main

main()
