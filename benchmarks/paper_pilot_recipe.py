"""The paper-regime recipe probe behind configs/cifar10_vgg11_cem_paper_cpu.yaml (issue 24's pilot): a bare training
loop over the study's model on a 10,000-image CIFAR-10 subset, one variant per argument, printing the test
accuracy and the fraction of saturated sigmoid outputs after each epoch. Output as measured:
benchmarks/results/proposal_study-paper-cpu/pilot/recipe_10k.txt.

    OMP_NUM_THREADS=1 python benchmarks/paper_pilot_recipe.py A "B,warm=1" "D,lr=0.01" "I,clip=1"
    PLAIN=1 python benchmarks/paper_pilot_recipe.py PLAIN      # half-width VGG11 without bottleneck/sigmoid
Variant options after the name: lr=, warm= (epochs of linear warm-up), xavier=1, clip=, blr= (bottleneck lr
factor), ep= (epochs), nest=1 (Nesterov)."""
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
import sys, time, torch, torch.nn.functional as F
from torch import nn
from splitveil.models import ModelConfig, build_split_model
from splitveil import DataConfig, build_data
from splitveil.runtime import tune_allocator
tune_allocator(); torch.set_num_threads(1)
data = build_data(DataConfig(name="cifar10", root=str(ROOT.parent / "shared" / "data"), train_size=10000, test_size=2000, aux_size=1000, augment=True), seed=0)
import os
def make(xavier):
    torch.manual_seed(0)
    if os.environ.get("PLAIN"):
        m = build_split_model(ModelConfig(name="vgg11_bn", width=0.5, cut="conv2"), 10, (3, 32, 32))
    elif os.environ.get("NOSIG"):
        m = build_split_model(ModelConfig(name="vgg11_bn", width=1.0, cloud_width=0.5, cut="conv2", bottleneck_channels=8,
                          bottleneck_norm=False, bottleneck_act="none", sigmoid=False), 10, (3, 32, 32))
    else:
        m = build_split_model(ModelConfig(name="vgg11_bn", width=1.0, cloud_width=0.5, cut="conv2", bottleneck_channels=8,
                          bottleneck_norm=False, bottleneck_act="none", sigmoid=True), 10, (3, 32, 32))
    if xavier:
        for mod in m.modules():
            if isinstance(mod, (nn.Conv2d, nn.Linear)):
                nn.init.xavier_uniform_(mod.weight); nn.init.zeros_(mod.bias)
    return m.to(memory_format=torch.channels_last)
def run(name, lr=0.05, warm=0, xavier=False, epochs=2, clip=None, blr=1.0, nest=False):
    m = make(xavier)
    bn = [p for n_, p in m.named_parameters() if "bottleneck" in n_]
    rest = [p for n_, p in m.named_parameters() if "bottleneck" not in n_]
    opt = torch.optim.SGD([{"params": rest, "lr": lr}, {"params": bn, "lr": lr * blr, "scale": blr}], lr=lr, momentum=0.9, weight_decay=5e-4, nesterov=nest)
    g = torch.Generator().manual_seed(0); steps = len(data.train) // 128; k = 0; t = time.perf_counter()
    for ep in range(epochs):
        m.train()
        for x, y in data.batches(data.train, 128, "cpu", shuffle=True, generator=g, augment=True, drop_last=True):
            if warm: 
                for gr in opt.param_groups: gr["lr"] = lr * gr.get("scale", 1.0) * min(1.0, (k + 1) / (warm * steps))
            with torch.autocast("cpu", dtype=torch.bfloat16):
                z = m.encoder(x.contiguous(memory_format=torch.channels_last))
            z = z.float() + 0.025 * torch.randn_like(z.float())
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = m.decoder(z)
            loss = F.cross_entropy(out.float(), y); opt.zero_grad(); loss.backward()
            if clip: torch.nn.utils.clip_grad_norm_(m.parameters(), clip)
            opt.step(); k += 1
        m.eval(); c = 0; sat = 0; n = 0
        with torch.no_grad():
            for x, y in data.batches(data.test, 500, "cpu"):
                z = m.encoder(x); sat += ((z < 0.02) | (z > 0.98)).float().mean() * len(y)
                c += (m.decoder(z + 0.025 * torch.randn_like(z)).argmax(1) == y).sum(); n += len(y)
        print(f"{name} epoch {ep+1}: test acc {int(c)/n:.3f}, saturated {float(sat)/n:.2f}, {time.perf_counter()-t:.0f}s", flush=True)
for v in sys.argv[1:]:
    kw = dict(a.split("=") for a in v.split(",")[1:]) if "," in v else {}
    run(v, lr=float(kw.get("lr", 0.05)), warm=float(kw.get("warm", 0)), xavier=kw.get("xavier") == "1", clip=float(kw["clip"]) if "clip" in kw else None, blr=float(kw.get("blr", 1)), epochs=int(kw.get("ep", 2)), nest=kw.get("nest") == "1")
