"""The generation engine of the ONNX chat model: one `og.Engine`, driven by a thread of its own,
which batches the requests in flight at the same time (concurrent calls from a threaded server,
the rows of a batch, the `n` choices of a request). Greedy tokens are the same as one request at
a time (what that buys under concurrent clients: bench/README.md, bench/concurrent_generation.py).

Ships inside the ONNX model beside its model file (`code_paths`, imported as `onnx_engine`
there), so it imports nothing of this project: onnxruntime-genai, mlflow and numpy only. A
caller submits a prompt's ids with its options (steps/serving/chat_protocol.py's Options) and
reads the token ids, then one Finished, from the returned Turn's queue.
"""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from mlflow.exceptions import MlflowException

if TYPE_CHECKING:
    from chat_protocol import Options


@dataclass(frozen=True)
class Finished:
    """The end of a turn: by the model's end token (`eos`), else at its token limit; `error`
    when the engine failed it."""

    eos: bool
    error: str | None = None


class Turn:
    """One request's turn in the engine (onnxruntime-genai's word: a Request begins a turn):
    its prompt and options, and the queue its tokens (ints), then one Finished, arrive on."""

    def __init__(self, loop: EngineLoop, ids: np.ndarray, options: Options, max_new: int):
        self.ids, self.options, self.max_new = ids, options, max_new
        self.events: queue.SimpleQueue[int | Finished] = queue.SimpleQueue()
        self._loop = loop

    def cancel(self) -> None:
        self._loop.inbox.put(("cancel", self))


class EngineLoop:
    """An og.Engine driven by its own thread, since Engine calls must come from the thread that
    owns it. Callers on any thread submit turns; the loop starts them between engine steps, so
    requests that arrive while others decode join the next batch."""

    def __init__(self, model):
        self._model = model
        self.inbox: queue.SimpleQueue[tuple[str, Turn | None]] = queue.SimpleQueue()
        self._broken: str | None = None
        threading.Thread(target=self._serve, name="og-engine", daemon=True).start()

    def submit(self, ids: np.ndarray, options: Options, max_new: int) -> Turn:
        """Queue a prompt for the next engine step; its tokens arrive on the Turn's `events`."""
        if self._broken:
            raise MlflowException(f"the generation engine stopped: {self._broken}")
        turn = Turn(self, ids, options, max_new)
        self.inbox.put(("begin", turn))
        return turn

    def close(self) -> None:
        """End the loop's thread, and with it the engine: once no turn is running."""
        self.inbox.put(("close", None))

    def _serve(self) -> None:
        active: dict[Any, Turn] = {}  # og.Request -> turn
        try:
            self._loop(active)
        except BaseException as error:  # no caller may wait forever on a dead loop
            self._broken = f"{type(error).__name__}: {error}"
            waiting = [turn for kind, turn in self._arrivals(block=False) if kind == "begin"]
            for turn in [*active.values(), *waiting]:
                turn.events.put(Finished(eos=False, error=self._broken))
            raise

    def _loop(self, active: dict[Any, Turn]) -> None:
        import onnxruntime_genai as og

        engine = og.Engine(self._model)
        buffer = engine.create_event_buffer(256)
        started: dict[Turn, tuple[Any, int]] = {}  # turn -> (og.Request, turn id)
        done = og.EngineEventFlags.TURN_FINISHED | og.EngineEventFlags.FAILED
        while True:
            for kind, turn in self._arrivals(block=not active):
                if kind == "close":
                    return
                if kind == "begin":
                    try:
                        request, turn_id = self._begin(engine, turn)
                    except RuntimeError as error:
                        turn.events.put(Finished(eos=False, error=str(error)))
                        continue
                    active[request] = turn
                    started[turn] = request, turn_id
                elif turn in started:
                    request, turn_id = started[turn]
                    request.cancel_turn(turn_id)
            if not active:
                continue
            try:
                events = engine.run(buffer)
            except RuntimeError as error:
                for turn in active.values():
                    turn.events.put(Finished(eos=False, error=str(error)))
                active.clear()
                started.clear()
                continue
            for event in events:
                turn = active[event.request]
                if event.flags & og.EngineEventFlags.TOKEN:
                    turn.events.put(int(event.token))
                if event.flags & done:
                    failed = event.flags & og.EngineEventFlags.FAILED
                    turn.events.put(
                        Finished(
                            eos=event.finish_reason == og.FinishReason.EOS,
                            error=f"engine error {event.error_code.name}" if failed else None,
                        )
                    )
                    del active[event.request], started[turn]
                    event.request.close()

    def _arrivals(self, block: bool) -> list[tuple[str, Turn | None]]:
        """Everything queued so far; when `block`, wait for at least one item first."""
        arrived = []
        try:
            arrived.append(self.inbox.get(block=block))
            while True:
                arrived.append(self.inbox.get_nowait())
        except queue.Empty:
            return arrived

    @staticmethod
    def _begin(engine, turn: Turn) -> tuple[Any, int]:
        import onnxruntime_genai as og

        # Size the request's cache for this prompt and answer, not the model's whole window.
        request_options = og.RequestOptions()
        request_options.set_max_session_tokens(len(turn.ids) + turn.max_new)
        request = engine.create_request(options=request_options)
        turn_options = og.TurnOptions(request)
        turn_options.set_max_generated_tokens(turn.max_new)
        turn_options.set_do_sample(turn.options.do_sample)
        if turn.options.do_sample:
            turn_options.set_temperature(turn.options.temperature)
            turn_options.set_top_p(turn.options.top_p)
        if turn.options.grammar is not None:
            turn_options.set_guidance("lark_grammar", turn.options.grammar)
        return request, request.begin_turn(np.asarray(turn.ids, dtype=np.int32), turn_options)
