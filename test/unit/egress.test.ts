/** [egress] address classes (DESIGN §9c): one table row per class, from ipaddr.js alone. */
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { isCidr, parseCidrs, resolveAndVet, vetAddress, type EgressPolicy } from '../../gateway/src/egress.js';

const NONE: EgressPolicy = { allow: [], deny: [] };

const REFUSED: readonly [string, string][] = [
  ['127.0.0.1', 'loopback'],
  ['127.255.255.254', 'loopback'],
  ['::1', 'loopback'],
  ['10.0.0.1', 'private'],
  ['172.16.5.4', 'private'],
  ['192.168.1.1', 'private'],
  ['169.254.169.254', 'linkLocal (cloud metadata)'],
  ['fe80::1', 'linkLocal'],
  ['100.64.0.1', 'carrierGradeNat'],
  ['100.100.100.200', 'carrierGradeNat (Alibaba metadata)'],
  ['fc00::1', 'uniqueLocal'],
  ['fd00:ec2::254', 'uniqueLocal (AWS metadata over IPv6)'],
  ['224.0.0.1', 'multicast'],
  ['ff02::1', 'multicast'],
  ['0.0.0.0', 'unspecified'],
  ['::', 'unspecified'],
  ['255.255.255.255', 'broadcast'],
  ['240.0.0.1', 'reserved'],
  ['192.0.2.1', 'documentation (reserved)'],
  ['198.51.100.7', 'documentation (reserved)'],
  ['203.0.113.9', 'documentation (reserved)'],
  ['2001:db8::1', 'documentation (reserved)'],
  ['198.18.0.1', 'benchmarking (reserved)'],
  ['::ffff:127.0.0.1', 'IPv4-mapped loopback'],
  ['::ffff:10.0.0.1', 'IPv4-mapped private'],
  ['::127.0.0.1', 'IPv4-compatible loopback'],
  // Regression: the hex form a resolver returns was `unicast` to ipaddr.js, so a name with an
  // AAAA record ::7f00:1 was dialled instead of refused.
  ['::7f00:1', 'IPv4-compatible loopback, hex form'],
  ['::a00:1', 'IPv4-compatible private, hex form'],
  ['::808:808', 'IPv4-compatible (any embedding is refused)'],
  ['64:ff9b::a00:1', 'NAT64 of 10.0.0.1'],
  ['64:ff9b::808:808', 'NAT64 (any embedding is refused)'],
  ['2002:7f00:1::1', '6to4 of 127.0.0.1'],
  ['2001::1', 'Teredo'],
  ['100::1', 'discard-only'],
  // Regression: outside 2000::/3 but in no range ipaddr.js names, these were `unicast` and dialled.
  ['4000::1', 'reserved by the IETF (outside 2000::/3)'],
  ['1::1', 'reserved by the IETF (outside 2000::/3)'],
  ['fe00::1', 'reserved by the IETF (fe00::/9)'],
  ['e000::1', 'reserved by the IETF (outside 2000::/3)'],
];

for (const [address, what] of REFUSED) {
  test(`egress: ${address} (${what}) is refused by default`, () => {
    const verdict = vetAddress(address, NONE);
    assert.equal(verdict.allowed, false);
  });
}

for (const address of ['8.8.8.8', '1.1.1.1', '2606:4700:4700::1111', '::ffff:8.8.8.8', '2a00:1450:4001:80b::200e', '3ffe:ffff::1']) {
  test(`egress: global unicast ${address} is allowed`, () => {
    assert.deepEqual(vetAddress(address, NONE), { allowed: true });
  });
}

test('egress: allow_cidrs admits an internal mirror; deny_cidrs wins over allow and over global unicast', () => {
  const policy: EgressPolicy = { allow: parseCidrs(['10.1.2.3/32', '10.9.0.0/16']), deny: parseCidrs(['10.9.9.0/24', '8.8.8.0/24']) };
  assert.deepEqual(vetAddress('10.1.2.3', policy), { allowed: true });
  assert.equal(vetAddress('10.1.2.4', policy).allowed, false);
  assert.deepEqual(vetAddress('10.9.1.1', policy), { allowed: true });
  assert.deepEqual(vetAddress('10.9.9.9', policy), { allowed: false, why: 'in deny_cidrs 10.9.9.0/24' });
  assert.deepEqual(vetAddress('8.8.8.8', policy), { allowed: false, why: 'in deny_cidrs 8.8.8.0/24' });
  assert.deepEqual(vetAddress('1.1.1.1', policy), { allowed: true });
});

test('egress: a v4 allow range does not admit a v6 address, and the mapped form is judged as v4', () => {
  const policy: EgressPolicy = { allow: parseCidrs(['127.0.0.0/8']), deny: [] };
  assert.deepEqual(vetAddress('::ffff:127.0.0.1', policy), { allowed: true });
  assert.equal(vetAddress('::1', policy).allowed, false);
});

test('egress: IPv4-compatible addresses are refused with their class; allow_cidrs can still admit one', () => {
  assert.deepEqual(vetAddress('::7f00:1', NONE), { allowed: false, why: 'ipv4Compatible address' });
  assert.deepEqual(vetAddress('::7f00:1', { allow: parseCidrs(['::7f00:0/120']), deny: [] }), { allowed: true });
});

test('egress: an IPv4-mapped range in allow_cidrs or deny_cidrs is kept as the IPv4 range it names', () => {
  assert.deepEqual(parseCidrs(['::ffff:8.8.8.0/120', '::ffff:0:0/96', '::ffff:127.0.0.1/128']).map(([range, bits]) => `${range.toString()}/${bits}`), ['8.8.8.0/24', '0.0.0.0/0', '127.0.0.1/32']);
  // Regression: as written, a mapped deny range never matched (addresses are unwrapped to IPv4 first).
  const deny: EgressPolicy = { allow: [], deny: parseCidrs(['::ffff:8.8.8.0/120']) };
  assert.deepEqual(vetAddress('8.8.8.8', deny), { allowed: false, why: 'in deny_cidrs 8.8.8.0/24' });
  assert.deepEqual(vetAddress('::ffff:8.8.8.8', deny), { allowed: false, why: 'in deny_cidrs 8.8.8.0/24' });
  const allow: EgressPolicy = { allow: parseCidrs(['::ffff:10.1.0.0/112']), deny: [] };
  assert.deepEqual(vetAddress('10.1.2.3', allow), { allowed: true });
  assert.equal(vetAddress('10.2.0.1', allow).allowed, false);
  // Other IPv6 ranges are kept as they are.
  assert.deepEqual(parseCidrs(['fd00::/8', '::/0']).map(([range, bits]) => `${range.toString()}/${bits}`), ['fd00::/8', '::/0']);
});

test('egress: a name resolving to a public and a private address is refused; all-public is allowed', async () => {
  const signal = new AbortController().signal;
  const resolver = async (host: string) =>
    host === 'mixed.test' ? [{ address: '93.184.216.34', family: 4 as const }, { address: '10.0.0.5', family: 4 as const }] : [{ address: '93.184.216.34', family: 4 as const }];
  assert.deepEqual(await resolveAndVet('mixed.test', NONE, resolver, 1000, signal), { ok: false, kind: 'forbidden', address: '10.0.0.5', why: 'private address' });
  assert.deepEqual(await resolveAndVet('public.test', NONE, resolver, 1000, signal), { ok: true, addresses: [{ address: '93.184.216.34', family: 4 }] });
});

test('egress: resolution is bounded in time and by the CONNECT signal; failures are not_found', async () => {
  const never = () => new Promise<never>(() => {});
  const slow = await resolveAndVet('slow.test', NONE, never, 50, new AbortController().signal);
  assert.equal(slow.ok === false && slow.kind, 'timeout');
  const controller = new AbortController();
  const pending = resolveAndVet('slow.test', NONE, never, 10_000, controller.signal);
  controller.abort();
  assert.deepEqual(await pending, { ok: false, kind: 'aborted' });
  const failing = await resolveAndVet('nx.test', NONE, async () => { throw Object.assign(new Error('getaddrinfo ENOTFOUND nx.test'), { code: 'ENOTFOUND' }); }, 1000, new AbortController().signal);
  assert.equal(failing.ok === false && failing.kind, 'not_found');
});

test('egress: localhost resolves (system resolver, /etc/hosts) to loopback only, and is refused', async () => {
  const { systemResolver } = await import('../../gateway/src/egress.js');
  const verdict = await resolveAndVet('localhost', NONE, systemResolver, 2000, new AbortController().signal);
  assert.equal(verdict.ok, false);
  assert.equal(verdict.ok === false && verdict.kind, 'forbidden');
});

test('egress: CIDRs are taken in one spelling only (an octal or shorthand IPv4 range named another network)', () => {
  for (const good of ['10.0.0.0/8', '10.1.2.3/32', '0.0.0.0/0', '::/0', 'fd00::/8', '::ffff:10.0.0.0/104', '2001:db8::/32']) assert.equal(isCidr(good), true, good);
  for (const bad of ['010.0.0.0/8', '127.1/32', '0x7f.0.0.1/32', '1/8', '::ffff:010.0.0.0/104', 'fe80::1%eth0/64', '10.0.0.0/08', '10.0.0.0', '10.0.0.0/33', '::/129', ' 10.0.0.0/8']) assert.equal(isCidr(bad), false, bad);
});

// Regression: every CONNECT ran its own getaddrinfo on libuv's 4-thread pool, which cannot be
// cancelled; 8 CONNECTs to one name whose DNS never answers delayed an unrelated lookup by 12 s
// (past dial_timeout_ms), so every other agent's CONNECT to a hostname failed.
test('egress: lookups of one name in flight together are one lookup; none is kept after it settles', async () => {
  const { coalesced, systemResolver } = await import('../../gateway/src/egress.js');
  let calls = 0;
  let answer!: (value: { address: string; family: 4 }[]) => void;
  const resolver = coalesced(() => {
    calls++;
    return new Promise((resolve) => (answer = resolve));
  });
  const pending = [resolver('a.test'), resolver('a.test'), resolver('a.test')];
  assert.equal(calls, 1);
  answer([{ address: '93.184.216.34', family: 4 }]);
  for (const result of await Promise.all(pending)) assert.deepEqual(result, [{ address: '93.184.216.34', family: 4 }]);
  const again = resolver('a.test');
  assert.equal(calls, 2, 'a settled lookup is not reused');
  answer([]);
  await again;
  let failures = 0;
  const failing = coalesced(async () => {
    failures++;
    throw Object.assign(new Error('getaddrinfo EAI_AGAIN'), { code: 'EAI_AGAIN' });
  });
  const results = await Promise.allSettled([failing('b.test'), failing('b.test')]);
  assert.deepEqual([failures, results.map((r) => r.status)], [1, ['rejected', 'rejected']]);
  // The system resolver is coalesced too: two CONNECTs at once share one answer.
  const [first, second] = await Promise.all([systemResolver('localhost'), systemResolver('localhost')]);
  assert.equal(first, second);
});
