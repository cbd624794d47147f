import { setImmediate as nextTurn } from 'node:timers/promises';
import type { IncomingHttpHeaders, ServerHttp2Stream } from 'node:http2';
import { SpanKind, SpanStatusCode, type Context, type Span } from '@opentelemetry/api';
import type { Logger } from 'pino';
import type { AuthorizationRequest } from '../../registry/authorize.js';
import { normaliseDestination, type Destination } from '../../registry/destination.js';
import { RegistryUnavailableError } from '../../registry/errors.js';
import { classifyDialError } from '../../core/errors.js';
import type { GatewayConfig } from './config.js';
import type { Limiter } from './limits.js';
import type { Authoriser, Decision } from './authoriser.js';
import { EarlyData, type EarlyDataBudget, type EarlyDataOwner } from './early-data.js';
import { resolveAndVet, type HostResolver, type ResolvedAddress } from './egress.js';
import type { ResolverSlots } from './resolver-slots.js';
import { LookupCancelledError } from './lookups.js';
import { responseFor, type ConnectFacts, type Outcome, type OutcomeRecorder } from './outcome.js';
import type { GatewayMetrics } from './metrics.js';
import type { PolicyEnforcer } from './revocation.js';
import type { PeerSession } from './sessions.js';
import { traceIdFromTraceparent } from '../../core/traceparent.js';
import type { GatewayTracing } from './tracing.js';
import { dial, finishStream, Tunnel, TUNNEL_LINGER_MS, type SniGuard, type TunnelOwner, type TunnelStats } from './tunnel.js';
import type { OpenTunnel, TunnelTracker } from './tunnels.js';

/**
 * Why a CONNECT's signal fires. One shared reason: abort() without one builds a DOMException and
 * its stack for every stream that closes, 2% of the gateway's CPU at 3,700 CONNECTs/s.
 */
const STREAM_GONE = Object.freeze(new Error('the CONNECT stream closed'));

/** What a CONNECT needs from the gateway around it. */
export interface ConnectDeps {
  readonly config: GatewayConfig;
  /** The `[limits]` in force (reload swaps them). */
  limits(): GatewayConfig['limits'];
  isClosing(): boolean;
  nextConnectId(): string;
  readonly limiter: Limiter;
  readonly authoriser: Authoriser;
  readonly enforcer: PolicyEnforcer;
  readonly tunnels: TunnelTracker;
  /** Client bytes held before answers, process-wide (early-data.ts). */
  readonly earlyData: EarlyDataBudget;
  readonly recorder: OutcomeRecorder;
  readonly metrics: GatewayMetrics | undefined;
  readonly tracing: GatewayTracing | undefined;
  readonly log: Logger;
  /** How hostnames are resolved for [egress] vetting (tests inject one). */
  readonly resolver: HostResolver;
  /** Lookups each identity may have running (resolver-slots.ts). */
  readonly resolverSlots: ResolverSlots;
  /** Called once per CONNECT when it is over: answered and, if it opened a tunnel, the tunnel closed and recorded. */
  finished(): void;
}

/** The stages a CONNECT walks through, in DESIGN §3's order; the first failure answers. */
export type Stage = 'check' | 'admit' | 'authorise' | 'vet' | 'dial' | 'tunnel';

/**
 * One CONNECT, from its HEADERS to its last byte: check → admit → authorise → vet the address →
 * dial → tunnel. It owns an AbortSignal that fires when its stream goes away (the client reset
 * it, the session died, the socket dropped): a lookup result is then dropped and a dial aborted,
 * and the CONNECT still leaves exactly one decision record (`client_cancelled`).
 *
 * run() settles once the CONNECT is answered; an allowed one lives on as its tunnel's owner
 * (tunnelEnded), with no async frame suspended for the tunnel's life. `deps.finished` says when
 * it is over either way.
 */
export class ConnectRequest implements TunnelOwner, EarlyDataOwner {
  stage: Stage = 'check';
  readonly facts: ConnectFacts;
  readonly #deps: ConnectDeps;
  readonly #session: PeerSession;
  readonly #stream: ServerHttp2Stream;
  /** Read by the constructor and #check, then let go (an open tunnel may live for hours). */
  #headers: IncomingHttpHeaders | undefined;
  readonly #abort = new AbortController();
  #spanContext: Context | undefined;
  #decided = false;
  #finished = false;
  /** The normalised CONNECT destination, once #check has read it. */
  #destination: Destination | undefined;
  /** While a tunnel is open: its tracker entry, span and the limiter key whose slot it holds. */
  #open: OpenTunnel | undefined;
  #tunnelSpan: Span | undefined;
  #slot: string | undefined;
  /** The client's bytes before the answer, until the tunnel takes them or a refusal drops them. */
  #early: EarlyData | undefined;
  /** Why the gateway reset the stream before its answer (too many early bytes). */
  #resetWhy: string | undefined;

  constructor(deps: ConnectDeps, session: PeerSession, stream: ServerHttp2Stream, headers: IncomingHttpHeaders) {
    this.#deps = deps;
    this.#session = session;
    this.#stream = stream;
    this.#headers = headers;
    this.facts = { connectId: deps.nextConnectId(), startedAt: performance.now(), authorised: false, client: session.client };
    if (session.identity) {
      this.facts.identity = session.identity.identity;
      this.facts.spkiFingerprint = session.identity.fingerprint;
    } else if (session.fingerprint) this.facts.spkiFingerprint = session.fingerprint;
    this.#startSpan();
  }

  get signal(): AbortSignal {
    return this.#abort.signal;
  }

  /**
   * Runs every stage up to the answer; resolves when the CONNECT is answered (an allowed one goes
   * on as a tunnel, and deps.finished reports its end).
   */
  async run(): Promise<void> {
    const gone = () => this.#abort.abort(STREAM_GONE);
    this.#stream.once('close', gone);
    this.#early = new EarlyData(this.#stream, this.#session, this.#deps.earlyData, this);
    /** The limiter key whose tunnel slot this CONNECT holds, until a tunnel takes it over. */
    let slot: string | undefined;
    try {
      const admitted = this.#check();
      if (!admitted.ok) return this.#answer(admitted.outcome);
      slot = admitted.slot;
      const opened = await this.#authoriseAndDial();
      if ('reason' in opened) return this.#answer(opened);
      // The slot is the tunnel's now: tunnelEnded gives it back.
      const held = slot;
      slot = undefined;
      this.#openTunnel(opened.tunnel, opened.decision, held);
    } catch (error) {
      this.#deps.log.error({ event: 'connect_error', connect_id: this.facts.connectId, stage: this.stage, err: (error as Error)?.stack ?? String(error) }, 'unexpected error handling CONNECT');
      try {
        if (!this.#decided) this.#answer({ reason: 'internal_error', detail: `${this.stage}: ${(error as Error)?.message ?? String(error)}` });
      } catch {
        // The stream broke while answering: the record below still says what happened.
        this.#record({ reason: 'internal_error', detail: `${this.stage}: ${(error as Error)?.message ?? String(error)}` });
      }
      if (!this.#stream.destroyed) this.#stream.destroy();
    } finally {
      this.#stream.removeListener('close', gone);
      if (slot !== undefined) this.#deps.limiter.release(slot);
      if (!this.#open) this.#finish();
    }
  }

  /** The stream sent more before its answer than early-data.ts allows, and was reset. */
  earlyDataRefused(why: string): void {
    this.#resetWhy ??= why;
  }

  #finish(): void {
    if (this.#finished) return;
    this.#finished = true;
    this.#deps.finished();
  }

  /** Method, authority, identity, shutdown, limits: everything decided without I/O. */
  #check(): { ok: true; slot: string | undefined } | { ok: false; outcome: Outcome } {
    const headers = this.#headers!;
    this.#headers = undefined;
    const method = headers[':method'];
    if (method !== 'CONNECT') return { ok: false, outcome: { reason: 'method_not_allowed', detail: `method ${String(method).slice(0, 32)}` } };
    const rawAuthority = headers[':authority'];
    if (rawAuthority !== undefined) this.facts.authority = String(rawAuthority).slice(0, 300);
    let destination: Destination;
    try {
      destination = normaliseDestination(typeof rawAuthority === 'string' ? rawAuthority : '');
    } catch (error) {
      return { ok: false, outcome: { reason: 'authority_invalid', detail: (error as Error).message } };
    }
    this.facts.destination = destination.authority;
    this.#destination = destination;
    const identity = this.#session.identity;
    if (!identity) return { ok: false, outcome: { reason: 'identity_invalid', detail: this.#session.identityError } };
    if (this.#deps.isClosing()) return { ok: false, outcome: { reason: 'shutting_down' } };

    this.stage = 'admit';
    const limiter = this.#deps.limiter;
    const admitted = limiter.admit(identity.limitKey);
    if (!admitted.ok) {
      const detail = admitted.reason === 'rate_limited' ? `over ${limiter.settings.connect_rate_per_second}/s (burst ${limiter.settings.connect_burst})` : `${limiter.settings.max_tunnels_per_identity} open`;
      return { ok: false, outcome: { reason: admitted.reason, detail } };
    }
    return { ok: true, slot: admitted.slot ? identity.limitKey : undefined };
  }

  async #authoriseAndDial(): Promise<Outcome | { tunnel: Tunnel; decision: Decision }> {
    const { config, authoriser, metrics } = this.#deps;
    const identity = this.#session.identity!;
    const destination = this.facts.destination!;
    const signal = this.#abort.signal;
    const request = { identity: identity.identity, spkiDer: identity.spkiDer, destination };

    this.stage = 'authorise';
    const decided = await this.#authorise(request);
    if (!('result' in decided)) return decided;
    let decision = decided;
    if (signal.aborted) return this.#cancelled();

    this.stage = 'vet';
    // [resolve] overrides are the operator's choice and exempt from [egress]; authorization used
    // the normalised name either way. Anything else is resolved once and every address vetted.
    const connectHost = this.#destination!;
    const override = config.resolve.get(destination);
    const target = override ?? connectHost;
    let vetted: readonly ResolvedAddress[] | undefined;
    if (!override) {
      const { resolver, resolverSlots } = this.#deps;
      // A lookup still waiting for its identity's slot when this CONNECT stops waiting (answer,
      // timeout, reset) never starts.
      let waiting = true;
      const resolve: HostResolver = (host) => resolverSlots.run(identity.identity, host, () => resolver(host), () => waiting);
      const verdict = await resolveAndVet(target.host, config.egress.policy, resolve, this.#deps.limits().dial_timeout_ms, signal);
      waiting = false;
      if (!verdict.ok) {
        if (verdict.kind === 'aborted') return this.#cancelled();
        if (verdict.kind === 'forbidden') return { reason: 'destination_forbidden', detail: `${target.host} → ${verdict.address}: ${verdict.why}` };
        return { reason: 'dial_failed', dialError: verdict.kind === 'timeout' ? 'connection_timeout' : 'destination_not_found', detail: verdict.message };
      }
      vetted = verdict.addresses;
    }
    // A cached decision is reached within the read that brought the HEADERS: let the rest of that
    // read (a RST_STREAM in the same packet) be seen before anything is dialled, as a lookup is
    // sent only after it (lookups.ts). Otherwise HEADERS+RST_STREAM pairs would make the gateway
    // open a TCP connection to the destination for each (review).
    if (decision.cached) await nextTurn();
    if (signal.aborted || this.#streamGone()) return this.#cancelled();

    this.stage = 'dial';
    const dialSpan = this.#childSpan('agent_gateway.dial', SpanKind.CLIENT, { 'server.address': target.host, 'server.port': target.port });
    const dialled = await dial(target.host, target.port, this.#deps.limits().dial_timeout_ms, signal, vetted);
    if (dialSpan) {
      if (!dialled.ok) dialSpan.setStatus({ code: SpanStatusCode.ERROR, message: `${dialled.type}: ${dialled.message}` });
      dialSpan.end();
    }
    if (!dialled.ok) {
      if (dialled.type === 'aborted') return this.#cancelled();
      return { reason: 'dial_failed', dialError: dialled.type, detail: `${dialled.type}: ${dialled.message}` };
    }
    // A notification heard meanwhile may be a change this decision predates: its counter read
    // (at most NOTIFY_CONFIRM_MS) tells, and advances the generation if so.
    const answering = authoriser.notificationsAnswered();
    if (answering) await answering;
    if (signal.aborted || this.#streamGone()) {
      dialled.socket.destroy();
      return this.#cancelled();
    }
    if (!authoriser.isCurrent(decision) || performance.now() >= decision.expiresAt) {
      // A registry change arrived, or not_after passed, while the address was vetted or dialled:
      // the decision may no longer hold. Asked again before the answer, a revoked CONNECT gets no
      // 200 and none of its early bytes reach the destination; the enforcer's re-check of an
      // opened tunnel would come only after both (and, after a slow dial, past §9b's 1 s).
      this.stage = 'authorise';
      const socket = dialled.socket;
      // dial() no longer listens for errors: a reset meanwhile must not go unhandled.
      let lost: NodeJS.ErrnoException | undefined;
      const onLost = (error: NodeJS.ErrnoException) => void (lost ??= error);
      socket.on('error', onLost);
      let again: Outcome | Decision;
      try {
        again = await this.#authorise(request);
      } catch (error) {
        socket.destroy();
        throw error;
      } finally {
        socket.removeListener('error', onLost);
      }
      const gone = signal.aborted || this.#streamGone();
      if (!('result' in again) || gone || socket.destroyed) {
        socket.destroy();
        if (!('result' in again)) return again;
        if (gone) return this.#cancelled();
        return { reason: 'dial_failed', dialError: classifyDialError(lost, false), detail: `destination closed while the registry was asked again: ${lost?.message ?? 'closed'}` };
      }
      decision = again;
    }
    this.stage = 'tunnel';
    this.#stream.respond({ ':status': 200 });
    this.#session.answered(true, authoriser.isCurrent(decision));
    this.#record({ reason: 'allowed' });
    const egress = config.egress;
    const guard: SniGuard | undefined =
      egress.sni === 'off'
        ? undefined
        : { mode: egress.sni, host: connectHost.host, hostIsIp: connectHost.kind !== 'hostname', timeoutMs: egress.sni_timeout_ms, onRefuse: () => metrics?.policyClose('sni_mismatch') };
    const early = this.#early!.release();
    this.#early = undefined;
    return { tunnel: new Tunnel(this.#stream, dialled.socket, this.#deps.limits().idle_timeout_ms, this, guard, early), decision };
  }

  /** The decision for `request` (cached, or asked of the registry), or the outcome that answers the CONNECT instead. */
  async #authorise(request: AuthorizationRequest): Promise<Outcome | Decision> {
    const { authoriser, metrics } = this.#deps;
    const signal = this.#abort.signal;
    if (signal.aborted) return this.#cancelled();
    const lookupSpan = this.#childSpan('agent_gateway.registry_lookup', SpanKind.CLIENT, {
      'db.system.name': 'postgresql',
      'db.operation.name': 'SELECT',
      'db.query.summary': 'SELECT permission_registry',
      'agent_gateway.destination': request.destination,
    });
    const authStarted = performance.now();
    let decision: Decision;
    try {
      decision = authoriser.cached(request) ?? (await authoriser.lookUp(request, signal, this.#session));
      lookupSpan?.setAttribute('agent_gateway.cached', decision.cached);
      lookupSpan?.end();
    } catch (error) {
      if (lookupSpan) {
        lookupSpan.setStatus({ code: SpanStatusCode.ERROR, message: (error as Error).message });
        lookupSpan.end();
      }
      if (error instanceof LookupCancelledError) return this.#cancelled();
      if (error instanceof RegistryUnavailableError) {
        metrics?.authorization((performance.now() - authStarted) / 1000, 'unavailable');
        return { reason: 'registry_unavailable', detail: error.message };
      }
      throw error;
    }
    const result = decision.result;
    // Assigned, not only set: a CONNECT asked again (after a change) is decided by the second answer.
    this.facts.cached = decision.cached;
    if (!decision.cached) metrics?.authorization((performance.now() - authStarted) / 1000, result.allowed ? 'allowed' : 'denied');
    if (!result.allowed) {
      // The row that explains the denial, for operators (log, audit); the client sees not_authorized only.
      const explaining = result.verdicts.find((v) => v.reason === result.reason)?.permissionId;
      if (explaining) this.facts.permissionId = explaining;
      return { reason: 'not_authorized', detail: result.reason };
    }
    this.facts.permissionId = result.permissionId;
    this.facts.authorised = true;
    return decision;
  }

  #openTunnel(tunnel: Tunnel, decision: Decision, slot: string | undefined): void {
    const { tunnels, enforcer } = this.#deps;
    const facts = this.facts;
    const open: OpenTunnel = {
      connectId: facts.connectId,
      identity: facts.identity!,
      spkiFingerprint: facts.spkiFingerprint!,
      spkiDer: this.#session.identity!.spkiDer,
      destination: facts.destination!,
      permissionId: facts.permissionId!,
      openedAt: Date.now(),
      tunnel,
      reportedUp: 0,
      reportedDown: 0,
    };
    // First, before anything that could throw: from here on, tunnelEnded owns the slot and the record.
    this.#open = open;
    this.#slot = slot;
    this.#destination = undefined;
    this.#tunnelSpan = this.#childSpan('agent_gateway.tunnel', SpanKind.INTERNAL, {});
    tunnels.add(open);
    enforcer.tunnelOpened(open, decision);
  }

  /** The tunnel's last side closed: it leaves the tracker and the limiter, and is recorded. */
  tunnelEnded(stats: TunnelStats): void {
    const open = this.#open;
    if (!open) return;
    this.#open = undefined;
    const slot = this.#slot;
    this.#slot = undefined;
    const { tunnels, recorder, enforcer, log } = this.#deps;
    // Called from a socket's or stream's 'close' listener: a throw here would end the process.
    try {
      tunnels.delete(open);
      enforcer.tunnelClosed(open);
      recorder.tunnelClosed(this.facts, open, stats, this.#tunnelSpan);
    } catch (error) {
      log.error({ event: 'connect_error', connect_id: this.facts.connectId, stage: 'tunnel', err: (error as Error)?.stack ?? String(error) }, 'unexpected error recording a closed tunnel');
    } finally {
      if (slot !== undefined) this.#deps.limiter.release(slot);
      this.#finish();
    }
  }

  #streamGone(): boolean {
    return this.#stream.closed || this.#stream.destroyed;
  }

  #cancelled(): Outcome {
    const resetWhy = this.#resetWhy;
    return { reason: 'client_cancelled', detail: resetWhy ? `reset by the gateway during ${this.stage} (ENHANCE_YOUR_CALM): ${resetWhy}` : `stream gone during ${this.stage}` };
  }

  /** Sends the answer (unless the stream is gone: then the outcome is client_cancelled) and records it. */
  #answer(outcome: Outcome): void {
    // No tunnel will take the client's early bytes.
    this.#early?.drop();
    const response = responseFor(outcome);
    if (response && this.#streamGone()) {
      this.#record(this.#cancelled());
      return;
    }
    if (response) {
      const stream = this.#stream;
      stream.respond({ ':status': response.status, ...response.headers }, { endStream: true });
      // The client ends its half with END_STREAM; one that does not is reset once, later.
      if (!stream.closed) {
        const timer = setTimeout(() => finishStream(stream), TUNNEL_LINGER_MS);
        stream.once('close', () => clearTimeout(timer));
      }
    }
    this.#session.answered(false);
    this.#record(outcome);
  }

  #record(outcome: Outcome): void {
    if (this.#decided) return;
    this.#decided = true;
    this.#deps.recorder.decision(this.facts, outcome);
  }

  /** The CONNECT span continues the sidecar's trace and links to the session's span. */
  #startSpan(): void {
    const tracing = this.#deps.tracing;
    const headers = this.#headers!;
    if (!tracing?.enabled) {
      const traceId = traceIdFromTraceparent(headers.traceparent);
      if (traceId) this.facts.traceId = traceId;
      return;
    }
    const parent = tracing.extract(headers);
    const span: Span = tracing.tracer.startSpan(
      'CONNECT',
      {
        kind: SpanKind.SERVER,
        attributes: { 'http.request.method': String(headers[':method']), 'agent_gateway.connect_id': this.facts.connectId },
        ...(this.#session.span ? { links: [{ context: this.#session.span.spanContext() }] } : {}),
      },
      parent,
    );
    this.facts.span = span;
    this.#spanContext = tracing.withSpan(parent, span);
    this.facts.traceId = span.spanContext().traceId;
  }

  #childSpan(name: string, kind: SpanKind, attributes: Record<string, string | number>): Span | undefined {
    const tracing = this.#deps.tracing;
    if (!tracing?.enabled || !this.#spanContext) return undefined;
    return tracing.tracer.startSpan(name, { kind, attributes }, this.#spanContext);
  }
}
