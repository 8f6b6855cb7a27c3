// A spike of uncached reads: ramping-vus from 0 to SPIKE_VUS over SPIKE_RAMP_UP, held for
// SPIKE_HOLD, back to 0 over SPIKE_RAMP_DOWN, every VU reading GET /api/products/<random id in
// 1..PRODUCTS> without pause. scripts/bench spike seeds 1,000,000 products, so nearly every read
// misses the cache and goes to PostgreSQL. An overloaded service may shed load with 503 (and
// Retry-After): 200 and 503 are the expected answers, counted apart; anything else (another
// status, or status 0: refused, reset or timed out) is counted as other and must not happen.
//   k6 run -e BASE_URL=http://127.0.0.1:8000 -e PRODUCTS=1000000 -e SPIKE_VUS=2000 k6/spike.js
// Optional: SPIKE_VUS (2000, 1..20000), SPIKE_RAMP_UP (10s), SPIKE_HOLD (20s), SPIKE_RAMP_DOWN
// (5s) (each at most 10m), SUMMARY=path (JSON summary), P95_MS (a p(95) latency threshold: none
// unless given, the spike is about what answers, not how fast).
import http from 'k6/http';
import { check } from 'k6';
import { Counter } from 'k6/metrics';
import { PRODUCT, count, fmt, commonOptions, read, report, seconds } from './lib.js';

function setting(name, fallback, min, max) {
  const raw = __ENV[name] || fallback;
  const value = name === 'SPIKE_VUS' ? Number(raw) : seconds(raw);
  if (!(value >= min && value <= max) || (name === 'SPIKE_VUS' && !Number.isInteger(value))) {
    const unit = name === 'SPIKE_VUS' ? '' : ' s';
    throw new Error(`${name} must be from ${min} to ${max}${unit}, got '${raw}'`);
  }
  return value;
}

const SPIKE_VUS = setting('SPIKE_VUS', '2000', 1, 20000);
const UP = setting('SPIKE_RAMP_UP', '10s', 1, 600);
const HOLD = setting('SPIKE_HOLD', '20s', 0, 600);
const DOWN = setting('SPIKE_RAMP_DOWN', '5s', 1, 600);
const SHAPE = `${UP}s+${HOLD}s+${DOWN}s`;

http.setResponseCallback(http.expectedStatuses(200, 503));
const ok = new Counter('status_200');
const shed = new Counter('status_503');
const other = new Counter('status_other');

export const options = commonOptions({
  scenarios: {
    spike: {
      executor: 'ramping-vus',
      startVUs: 0,
      stages: [
        { duration: `${UP}s`, target: SPIKE_VUS },
        { duration: `${HOLD}s`, target: SPIKE_VUS },
        { duration: `${DOWN}s`, target: 0 },
      ],
    },
  },
  thresholds: {
    http_req_failed: ['rate==0'],
    status_other: ['count==0'],
    http_req_duration: __ENV.P95_MS ? [`p(95)<${__ENV.P95_MS}`] : null,
    // Always true: there so that k6 keeps the latencies of the 200s apart.
    'http_req_duration{status:200}': ['max>=0'],
  },
});

export default function () {
  const res = read(PRODUCT);
  if (res.status === 200) ok.add(1);
  else if (res.status === 503) shed.add(1);
  else other.add(1);
  check(res, {
    'status is 200, or 503 with Retry-After': (r) =>
      r.status === 200 || (r.status === 503 && !!r.headers['Retry-After']),
  });
}

export function handleSummary(data) {
  return report(data, {
    script: 'spike',
    vus: SPIKE_VUS,
    duration: SHAPE,
    extra: (d, s) => {
      const ok200 = d.metrics['http_req_duration{status:200}'];
      s.statuses = {
        200: count(d, 'status_200'),
        503: count(d, 'status_503'),
        other: count(d, 'status_other'),
      };
      s.p95_200_ms = ok200 && s.statuses[200] > 0 ? ok200.values['p(95)'] : null;
      return [
        `  answers: 200 ${s.statuses[200]}, 503 ${s.statuses[503]}, other ${s.statuses.other}` +
          ` (other must be 0); p95 of the 200s ${fmt(s.p95_200_ms, 2)} ms`,
      ];
    },
  });
}
