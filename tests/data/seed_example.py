# The seed's full example (shared/seeds/twinkle-client.en.md), verbatim except three things:
# the model id and the dataset id are the built-in ones, and base_url comes from the
# environment (the test starts the server on a free port).
import os
import dotenv
dotenv.load_dotenv('.env')

from peft import LoraConfig
from twinkle import get_logger
from twinkle.dataset import DatasetMeta

# import from twinkle_client instead of twinkle: the calls go to the server
from twinkle_client.dataloader import DataLoader
from twinkle_client.dataset import Dataset
from twinkle_client.model import MultiLoraTransformersModel
from twinkle_client import init_twinkle_client

logger = get_logger()

# Step 1: initialise the client
client = init_twinkle_client(
    base_url=os.environ['TWINKLE_SERVER_URL'],
    api_key=os.environ.get('MODELSCOPE_TOKEN')
)

# Step 2: look at existing training runs (optional, to resume)
runs = client.list_training_runs()
resume_path = None
for run in runs:
    checkpoints = client.list_checkpoints(run.training_run_id)
    for checkpoint in checkpoints:
        logger.info(checkpoint.model_dump_json(indent=2))
        # uncomment to resume from this checkpoint:
        # resume_path = checkpoint.twinkle_path

# Step 3: prepare the dataset
dataset = Dataset(dataset_meta=DatasetMeta('builtin://self-cognition'))

# set the chat template so the data matches the model's input format
dataset.set_template('Template', model_id='builtin://tiny-qwen2', max_length=512)

# preprocessing: replace the placeholders with a custom name
dataset.map('SelfCognitionProcessor',
            init_args={'model_name': 'twinkle模型', 'model_author': 'twinkle团队'})

# encode the dataset into model tokens
dataset.encode(batched=True)

# the DataLoader
dataloader = DataLoader(dataset=dataset, batch_size=8)

# Step 4: configure the model
model = MultiLoraTransformersModel(model_id='builtin://tiny-qwen2')

# LoRA
lora_config = LoraConfig(target_modules='all-linear')
model.add_adapter_to_model('default', lora_config, gradient_accumulation_steps=2)

# template, processor, loss
model.set_template('Template')
model.set_processor('InputProcessor', padding_side='right')
model.set_loss('CrossEntropyLoss')

# optimizer and learning-rate scheduler
model.set_optimizer('AdamW', lr=1e-4)
model.set_lr_scheduler('LinearLR')

# Step 5: resume (optional)
if resume_path:
    logger.info(f'Resuming training from {resume_path}')
    model.load(resume_path, load_optimizer=True)

# Step 6: the training loop
for step, batch in enumerate(dataloader):
    output = model.forward_backward(inputs=batch)      # forward + backward
    if step % 2 == 0:
        logger.info(f'Step {step // 2}, loss: {output}')
    model.clip_grad_norm(1.0)                          # gradient clipping
    model.step()                                       # optimizer update
    model.zero_grad()                                  # clear gradients
    model.lr_step()                                    # learning-rate schedule

# Step 7: save a checkpoint
twinkle_path = model.save(name=f'step-{step}', save_optimizer=True)
logger.info(f"Saved checkpoint: {twinkle_path}")

# Step 8: upload to the ModelScope hub (optional)
model.upload_to_hub(
    checkpoint_dir=twinkle_path,
    hub_model_id='your-username/your-model-name',
    async_upload=False
)
