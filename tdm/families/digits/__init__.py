"""The digits teachers: the committed pixel UNet (`digits`) and the tiny text-to-image pipeline (`digits-sd`),
with the data they were trained on."""
