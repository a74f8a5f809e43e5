"""`python -m skd.demo`: run the walkthrough."""

from skd.demo.walkthrough import main

main()
