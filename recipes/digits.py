"""The example recipe: a small timm ViT adapted on scikit-learn's digits (offline, CPU, seconds).

python recipes/digits.py fit --config recipes/digits/vit_tiny_adapter_digits.yaml
"""

from modalpeft.lightning import cli_main

if __name__ == "__main__":
    cli_main()
