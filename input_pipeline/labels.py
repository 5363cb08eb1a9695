"""Label and metadata names shared by every chest X-ray data set of the project."""

# The 14 ChestX-ray14 findings (alphabetical, spelled as in Data_Entry_2017*.csv),
# then `No Finding`: the order of the 15-long multi-hot `labels` feature.
FINDINGS = (
    'Atelectasis',
    'Cardiomegaly',
    'Consolidation',
    'Edema',
    'Effusion',
    'Emphysema',
    'Fibrosis',
    'Hernia',
    'Infiltration',
    'Mass',
    'Nodule',
    'Pleural_Thickening',
    'Pneumonia',
    'Pneumothorax',
)
NO_FINDING = 'No Finding'
LABELS = FINDINGS + (NO_FINDING,)

# ClassLabel names of the metadata features (index 0 first).
VIEWS = ('PA', 'AP')
SEXES = ('M', 'F')

# Classes of the 3-class transfer-learning set (phantom variant and folders).
COVID3_CLASSES = ('COVID-19', 'Pneumonia', 'Normal')
