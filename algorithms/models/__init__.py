"""What a model is and what can be done to it: the zoo and loading (``zoo``), block discovery and
removal (``blocks``), temporary masking (``masking``) and hidden-state capture with hooks (``capture``)."""
