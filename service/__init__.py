"""Visual question answering service: ViLBERT and LXMERT over Faster R-CNN regions."""
