import json, os
os.chdir('/tmp/abl')
def load(n):
    try:
        j = json.load(open(f'eval-{n}.json')); return j
    except Exception: return None
fp, w4 = load('fp'), load('w4')
pf, pw = fp['ppl'], w4['ppl']
print('| row | budget | ECs | EC bytes | ppl | gap recovered | NLL | mean KL | top-1 agree | calib KL (w4 %.4f) | guard α | calibrate s |' % json.load(open('static-qera-0.05.report.json'))['calib_kl_w4'])
print('|---|---|---|---|---|---|---|---|---|---|---|---|')
print(f"| fp | – | 0 | 0 | {pf:.3f} | – | {fp['nll']:.5f} | 0 | 1 | – | – | – |")
print(f"| w4 (RTN per channel) | – | 0 | 0 | {pw:.3f} | 0.0% | {w4['nll']:.5f} | {w4['mean_kl']:.5f} | {w4['top1_agreement']:.4f} | – | – | – |")
names = [('static-qera','static QERA, closed form'),('static-qera-g','static QERA, guarded'),
         ('static-rrr','static RRR (site refit), closed form'),('static-rrr-g','static RRR (site refit), guarded'),
         ('static-rrrlayer','static RRR, layer refit (before issue 11)'),
         ('e2e-none','e2e, ungated'),('e2e-diag','e2e, diagonal gate'),('e2e-full','e2e, full r×r gate'),('e2eL-none','e2e ungated, 32 windows × 3 epochs'),('e2eL-diag','e2e diagonal gate, 32 × 3'),('e2eL-full','e2e full gate, 32 × 3')]
for b in ['0.01','0.02','0.05']:
    for n, label in names:
        e = load(f'{n}-{b}')
        try: rep = json.load(open(f'{n}-{b}.report.json'))
        except Exception: rep = None
        if e is None: continue
        gap = (pw - e['ppl'])/(pw - pf)*100
        obj = rep['settings']['objective'] if rep else '?'
        ck = rep.get('calib_kl_static') if obj == 'static' else rep.get('calib_kl_trained')
        g = rep.get('static_guard') if rep else None
        ga = f"{g['alpha']:g}" if isinstance(g, dict) else '–'
        print(f"| {label} | {float(b)*100:g}% | {len(rep['placement'])} | {rep['ec_bytes']:,} | {e['ppl']:.3f} | {gap:.1f}% | {e['nll']:.5f} | {e['mean_kl']:.5f} | {e['top1_agreement']:.4f} | {ck:.5f} | {ga} | {rep['seconds']:.0f} |")
