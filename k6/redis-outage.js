// Reads while Redis goes away and comes back: VUS virtual users for DURATION (default 45s) doing
// mixed.js's reads in its proportions (8/19 /api/products/<id>, 8/19 .../stock, 3/19 list pages,
// random ids and pages), every request tagged phase=before|outage|after by when it starts,
// compared with OUTAGE_START and OUTAGE_END (seconds; default a third and two thirds of DURATION).
// The script does not touch Redis: whoever runs it stops Redis at OUTAGE_START and starts it again
// at OUTAGE_END (scripts/bench redis-outage does). Every request must succeed (reads fall back to
// PostgreSQL with X-Cache: BYPASS); X-Cache values are counted per phase, and hit_resumed_after_s
// records, for each HIT answered in phase after, how long after OUTAGE_END it came: its minimum
// is when the cache was back. With OUTAGE_START=0 and OUTAGE_END >= DURATION it is the
// PostgreSQL-only baseline (reported as redis-down): Redis is down throughout, all is phase outage.
//   k6 run -e BASE_URL=http://127.0.0.1:8000 -e VUS=200 -e DURATION=45s k6/redis-outage.js
// Optional: SUMMARY=path (JSON summary), P95_MS (p(95) threshold per phase, default 2000), T0_MS
// (epoch ms the phases count from: scripts/bench passes the instant it started k6, which it also
// times Redis from; default: when the test starts, after setup).
import { check } from 'k6';
import { Counter, Trend } from 'k6/metrics';
import { LIST, OK_CACHED, PRODUCT, STOCK, count, fmt, line, perTag, read } from './lib.js';
import { commonOptions, report, seconds, stats } from './lib.js';

const DURATION = __ENV.DURATION || '45s';
const TOTAL_S = seconds(DURATION);
const OUTAGE_START = parseFloat(__ENV.OUTAGE_START || String(Math.floor(TOTAL_S / 3)));
const OUTAGE_END = parseFloat(__ENV.OUTAGE_END || String(Math.floor((2 * TOTAL_S) / 3)));
if (!(OUTAGE_START >= 0 && OUTAGE_END > OUTAGE_START && TOTAL_S > 0)) {
  throw new Error(`need 0 <= OUTAGE_START < OUTAGE_END, got ${OUTAGE_START} and ${OUTAGE_END}`);
}
const DOWN = OUTAGE_START === 0 && OUTAGE_END >= TOTAL_S; // Redis down throughout
const SCRIPT = DOWN ? 'redis-down' : 'redis-outage';
const T0_MS = parseInt(__ENV.T0_MS || '0', 10);
const PHASES = ['before', 'outage', 'after'];
const XCACHE = ['HIT', 'MISS', 'BYPASS', 'none'];

const xcache = {};
for (const p of PHASES) {
  xcache[p] = {};
  for (const x of XCACHE) xcache[p][x] = new Counter(`x_cache_${p}_${x.toLowerCase()}`);
}
const hitResumed = new Trend('hit_resumed_after_s');

export const options = commonOptions({
  duration: DURATION,
  thresholds: {
    http_req_failed: ['rate==0'],
    ...perTag('phase', PHASES, { reqs: 'count>=0', failed: 'rate==0' }),
  },
});

export function setup() {
  const now = Date.now();
  return { t0: T0_MS || now, started: now };
}

function phase(elapsed) {
  if (DOWN || (elapsed >= OUTAGE_START && elapsed < OUTAGE_END)) return 'outage';
  return elapsed < OUTAGE_START ? 'before' : 'after';
}

export default function (setupData) {
  const p = phase((Date.now() - setupData.t0) / 1000);
  const r = Math.random() * 0.95;
  const res = read(r < 0.4 ? PRODUCT : r < 0.8 ? STOCK : LIST, { phase: p });
  check(res, OK_CACHED);
  const x = res.headers['X-Cache'];
  (xcache[p][x] || xcache[p].none).add(1);
  if (p === 'after' && x === 'HIT') {
    hitResumed.add((Date.now() - setupData.t0) / 1000 - OUTAGE_END);
  }
}

function phases(data, s) {
  // The load starts when setup returns, a little after T0 (k6 starting its VUs).
  const lead = data.setup_data ? (data.setup_data.started - data.setup_data.t0) / 1000 : 0;
  const span = DOWN
    ? { before: 0, outage: TOTAL_S, after: 0 }
    : {
        before: Math.max(0, OUTAGE_START - lead),
        outage: OUTAGE_END - OUTAGE_START,
        after: Math.max(0, TOTAL_S + lead - OUTAGE_END),
      };
  s.outage = { start_s: OUTAGE_START, end_s: OUTAGE_END, load_started_s: lead, down: DOWN };
  s.phases = {};
  for (const p of PHASES) {
    const x = {};
    for (const v of XCACHE) x[v] = count(data, `x_cache_${p}_${v.toLowerCase()}`);
    s.phases[p] = { ...stats(data, `phase:${p}`, span[p]), seconds: span[p], x_cache: x };
  }
  const failed = data.metrics.http_req_failed;
  s.failed_requests = failed ? failed.values.passes : 0;
  const hits = data.metrics.hit_resumed_after_s;
  s.hit_resumed_after_s = hits ? hits.values.min : null;
}

export function handleSummary(data) {
  return report(data, {
    script: SCRIPT,
    duration: DURATION,
    extra: (d, s) => {
      phases(d, s);
      const lines = [];
      for (const [p, x] of Object.entries(s.phases)) {
        const cache = XCACHE.map((v) => `${v} ${x.x_cache[v]}`).join(', ');
        lines.push(`${line(`  phase ${p} (${fmt(x.seconds, 1)} s)`, x)}; X-Cache ${cache}`);
      }
      lines.push(`  failed requests: ${s.failed_requests}`);
      if (DOWN) {
        lines.push('  Redis down throughout (OUTAGE_START=0, OUTAGE_END >= DURATION)');
      } else {
        const hit = s.hit_resumed_after_s;
        lines.push(
          `  first HIT after restore: ${hit === null ? 'none' : `${fmt(hit, 2)} s`} after ` +
            `OUTAGE_END (Redis out from ${OUTAGE_START} s to ${OUTAGE_END} s)`,
        );
      }
      return lines;
    },
  });
}
