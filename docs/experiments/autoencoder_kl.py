"""Quick (issue 28, part 6): which tiny AutoencoderKL beats naive 2x pooling on the demo's 48x64x48 volumes within N steps?

Arguments: channels (JSON) steps lr (sample|mean: decode a posterior sample or its mean) threads kl_weight.
Reads a make demo-latent run's shards (R below); plain Adam, no EMA, batches of 2 drawn at random."""
import sys, time, json
import numpy as np, torch, torch.nn.functional as F
sys.path.insert(0, "/work/main/src")
from brainddpm.data.shards import read_volumes, split_files
from brainddpm.models.autoencoder import build_autoencoder
from brainddpm.evaluation.reconstruction import naive_pooling
torch.set_num_threads(int(sys.argv[5]) if len(sys.argv) > 5 else 2)
R = "/tmp/lat/results/demo-latent/shards"
tr, _, _ = read_volumes(split_files(f"{R}/train")); va, _, _ = read_volumes(split_files(f"{R}/val"))
KLW = float(sys.argv[6]) if len(sys.argv) > 6 else 1e-6
channels = json.loads(sys.argv[1]); steps = int(sys.argv[2]); lr = float(sys.argv[3]); mode = sys.argv[4]
cfg = {"channels": channels, "latent_channels": 4, "num_res_blocks": 1, "attention_levels": [False]*len(channels),
       "norm_num_groups": 8, "use_checkpoint": False, "pad_multiple": 8, "patch": None, "kl_weight": 1e-6,
       "adversarial": {"weight": 0}, "perceptual": {"weight": 0}, "train": {}}
torch.manual_seed(0); ae = build_autoencoder(cfg)
opt = torch.optim.Adam(ae.parameters(), lr=lr)
g = np.random.default_rng(0); t0 = time.time()
for s in range(steps):
    x = torch.from_numpy(tr[g.choice(len(tr), 2, replace=False)])
    if mode == "mean":
        z_mu, z_sigma = ae.encode(x); rec = ae.decode(z_mu)
    else:
        rec, z_mu, z_sigma = ae(x)
    kl = 0.5 * torch.sum(z_mu.pow(2) + z_sigma.pow(2) - torch.log(z_sigma.pow(2)) - 1, dim=[1, 2, 3, 4]).mean()
    loss = F.l1_loss(rec, x) + KLW * kl
    opt.zero_grad(); loss.backward(); opt.step()
    if s % 50 == 0: print(s, round(loss.item(), 4), round(time.time() - t0), flush=True)
ae.eval(); ps, pn = [], []
with torch.no_grad():
    for v in va:
        z, _ = ae.encode(torch.from_numpy(v[None])); r = ae.decode(z).clamp(0, 1)[0].numpy()
        ps.append(10*np.log10(1/((r-v)**2).mean())); n = naive_pooling(v, 2); pn.append(10*np.log10(1/((n-v)**2).mean()))
print("RESULT", channels, steps, lr, mode, KLW, "kl %.0f" % kl.item(), "ae %.2f naive2x %.2f  s/step %.2f" % (np.mean(ps), np.mean(pn), (time.time()-t0)/steps))
