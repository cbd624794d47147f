/**
 * A scripted stand-in for the Anthropic Messages API, so that the real Claude Code binary runs the
 * demo with no account and no internet. The gateway reaches it as `api.anthropic.com:443` through
 * `[resolve]`; Claude Code trusts it through NODE_EXTRA_CA_CERTS (the mock CA).
 *
 * The script is one tool round: a request whose messages end in a user prompt is answered with a
 * `tool_use` of Bash running `curl -sS URL` (the first https URL in the prompt, else
 * https://docstore/documents); a request that carries the `tool_result` is answered with a final
 * text quoting what the tool printed. Requests without tools (Claude Code's side calls) get a short
 * text. Streaming (SSE) and non-streaming requests are both answered.
 */
import type { IncomingMessage, ServerResponse } from 'node:http';

const MAX_BODY_BYTES = 8 * 1024 * 1024;
const DEFAULT_URL = 'https://docstore/documents';
/** Only URLs this plain can reach the Bash command line: the prompt is not trusted to quote safely. */
const SAFE_URL = /https:\/\/[A-Za-z0-9.-]+(?::\d{1,5})?(?:\/[A-Za-z0-9._~\/-]*)?/;
const MAX_QUOTE_CHARS = 4000;

type Block = { type: 'text'; text: string } | { type: 'tool_use'; id: string; name: string; input: Record<string, unknown> };

interface MessagesRequest {
  model?: unknown;
  stream?: unknown;
  tools?: unknown;
  messages?: unknown;
}

let counter = 0;
const nextId = (prefix: string) => `${prefix}_demo${(++counter).toString().padStart(6, '0')}`;

function textOf(content: unknown): string {
  if (typeof content === 'string') return content;
  if (!Array.isArray(content)) return '';
  return content
    .map((block: { type?: unknown; text?: unknown; content?: unknown }) => {
      if (block?.type === 'text' && typeof block.text === 'string') return block.text;
      if (block?.type === 'tool_result') return textOf(block.content);
      return '';
    })
    .join('\n');
}

/** The scripted answer for one request. Exported for tests of the script itself. */
export function scriptedReply(request: MessagesRequest): { content: Block[]; stopReason: 'end_turn' | 'tool_use' } {
  const messages = Array.isArray(request.messages) ? (request.messages as { role?: unknown; content?: unknown }[]) : [];
  const last = messages.at(-1);
  const blocks = Array.isArray(last?.content) ? (last.content as { type?: unknown; content?: unknown; is_error?: unknown }[]) : [];
  const result = blocks.find((block) => block?.type === 'tool_result');
  if (result) {
    const output = textOf(result.content).trim().slice(0, MAX_QUOTE_CHARS);
    const verb = result.is_error === true ? 'The command failed' : 'The command returned';
    return { content: [{ type: 'text', text: `${verb}:\n\n${output || '(no output)'}` }], stopReason: 'end_turn' };
  }
  const tools = Array.isArray(request.tools) ? (request.tools as { name?: unknown }[]) : [];
  if (!tools.some((tool) => tool?.name === 'Bash')) {
    return { content: [{ type: 'text', text: 'Demo Messages API: nothing to do here.' }], stopReason: 'end_turn' };
  }
  // A sentence's closing full stop is not part of the URL.
  const url = SAFE_URL.exec(textOf(last?.content))?.[0].replace(/\.+$/, '') ?? DEFAULT_URL;
  const command = `curl -sS ${url}`;
  return {
    content: [
      { type: 'text', text: `I'll fetch ${url} with curl.` },
      { type: 'tool_use', id: nextId('toolu'), name: 'Bash', input: { command, description: `Fetch ${url}` } },
    ],
    stopReason: 'tool_use',
  };
}

function sse(res: ServerResponse, event: string, data: unknown): void {
  res.write(`event: ${event}\ndata: ${JSON.stringify(data)}\n\n`);
}

function send(res: ServerResponse, request: MessagesRequest): void {
  const { content, stopReason } = scriptedReply(request);
  const model = typeof request.model === 'string' ? request.model : 'claude-demo';
  const message = { id: nextId('msg'), type: 'message', role: 'assistant', model, stop_sequence: null, usage: { input_tokens: 1, output_tokens: 1 } };
  if (request.stream !== true) {
    res.writeHead(200, { 'content-type': 'application/json' }).end(JSON.stringify({ ...message, content, stop_reason: stopReason }));
    return;
  }
  res.writeHead(200, { 'content-type': 'text/event-stream', 'cache-control': 'no-cache' });
  sse(res, 'message_start', { type: 'message_start', message: { ...message, content: [], stop_reason: null } });
  content.forEach((block, index) => {
    if (block.type === 'text') {
      sse(res, 'content_block_start', { type: 'content_block_start', index, content_block: { type: 'text', text: '' } });
      sse(res, 'content_block_delta', { type: 'content_block_delta', index, delta: { type: 'text_delta', text: block.text } });
    } else {
      sse(res, 'content_block_start', { type: 'content_block_start', index, content_block: { ...block, input: {} } });
      sse(res, 'content_block_delta', { type: 'content_block_delta', index, delta: { type: 'input_json_delta', partial_json: JSON.stringify(block.input) } });
    }
    sse(res, 'content_block_stop', { type: 'content_block_stop', index });
  });
  sse(res, 'message_delta', { type: 'message_delta', delta: { stop_reason: stopReason, stop_sequence: null }, usage: { output_tokens: 1 } });
  sse(res, 'message_stop', { type: 'message_stop' });
  res.end();
}

function json(res: ServerResponse, status: number, body: unknown): void {
  res.writeHead(status, { 'content-type': 'application/json' }).end(JSON.stringify(body));
}

async function readJson(req: IncomingMessage): Promise<MessagesRequest> {
  const chunks: Buffer[] = [];
  let size = 0;
  for await (const chunk of req as AsyncIterable<Buffer>) {
    size += chunk.length;
    if (size > MAX_BODY_BYTES) throw new Error('body too large');
    chunks.push(chunk);
  }
  const parsed: unknown = JSON.parse(Buffer.concat(chunks).toString('utf8'));
  if (!parsed || typeof parsed !== 'object' || Array.isArray(parsed)) throw new Error('not a JSON object');
  return parsed as MessagesRequest;
}

export async function messagesApi(req: IncomingMessage, res: ServerResponse): Promise<void> {
  const path = (req.url ?? '').split('?')[0];
  // Claude Code asks for managed settings and policy limits first: there are none. Policy limits
  // without `restrictions` do not parse, and Claude Code retries them with backoff (seconds).
  if (req.method === 'GET' && path === '/api/claude_code/settings') return json(res, 200, {});
  if (req.method === 'GET' && path === '/api/claude_code/policy_limits') return json(res, 200, { restrictions: {} });
  if (req.method === 'POST' && path === '/v1/messages') {
    let request: MessagesRequest;
    try {
      request = await readJson(req);
    } catch (error) {
      return json(res, 400, { type: 'error', error: { type: 'invalid_request_error', message: (error as Error).message } });
    }
    return send(res, request);
  }
  return json(res, 404, { type: 'error', error: { type: 'not_found_error', message: `the demo Messages API has no ${req.method} ${path}` } });
}
