#!/usr/bin/env python3
"""System calls per reading from two `bench/probe.sh KIND trace N` outputs (N = 20 and 220),
saved as trace-KIND-20.txt and trace-KIND-220.txt: the difference over 200 readings, in total
and per thread."""
import re,sys,collections
def parse(f):
    per=collections.Counter(); threads=collections.defaultdict(collections.Counter); cur=None
    for line in open(f):
        m=re.match(r'\s*(\S.*) \((\d+)\), (\d+) events',line)
        if m: cur=m.group(1); continue
        m=re.match(r'\s+(\w+)\s+(\d+)\s+(\d+)\s+([\d.]+)',line)
        if m and cur:
            per[m.group(1)]+=int(m.group(2)); threads[cur][m.group(1)]+=int(m.group(2))
    return per,threads
k=sys.argv[1]; n=200
a,ta=parse(f'trace-{k}-20.txt'); b,tb=parse(f'trace-{k}-220.txt')
print(k, 'syscalls per reading (220-20 readings, 100 clients)')
tot=0
for s in sorted(set(a)|set(b), key=lambda s:-(b[s]-a[s])):
    d=(b[s]-a[s])/n; tot+=d
    if abs(d)>=0.05: print(f'  {s:12} {d:8.2f}')
print(f'  {"total":12} {tot:8.2f}')
for t in sorted(set(ta)|set(tb)):
    d=sum(tb[t].values())-sum(ta[t].values())
    print(f'  thread {t}: {d/n:.2f}  ', {s:round((tb[t][s]-ta[t][s])/n,2) for s in tb[t] if abs(tb[t][s]-ta[t][s])/n>=0.05})
