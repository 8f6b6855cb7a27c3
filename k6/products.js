// GET /api/products?page=P&limit=10 on random pages: the original project's headline test.
//   k6 run -e BASE_URL=http://127.0.0.1:8000 -e VUS=200 -e DURATION=30s -e PRODUCTS=10000 k6/products.js
// Optional: SUMMARY=path (JSON summary), P95_MS (latency threshold, default 2000).
import { check } from 'k6';
import { LIST, OK_CACHED, commonOptions, read, report } from './lib.js';

export const options = commonOptions();

export default function () {
  check(read(LIST), OK_CACHED);
}

export function handleSummary(data) {
  return report(data, { script: 'products' });
}
