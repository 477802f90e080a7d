using System.Buffers;
using System.Text;

namespace PaliGemma.CpuOnly.Model.Text;

/// <summary>
/// SentencePiece BPE encoding of already-normalized text that holds no user-defined/control pieces: start from single
/// characters, repeatedly merge the adjacent pair whose concatenation is the highest-scoring piece (ties: the leftmost
/// pair), re-split merged pieces of type Unused, and spell pieces that are not in the vocabulary as byte pieces (or
/// one unknown id without byte fallback). This is the algorithm of sentencepiece's <c>bpe_model.cc</c>.
/// </summary>
/// <remarks>
/// Microsoft.ML.Tokenizers 2.0.1's <c>SentencePieceTokenizer</c> runs the same loop but breaks equal-score ties toward
/// the rightmost pair, which changes ids whenever one piece can be formed at overlapping places (three spaces give
/// [▁, ▁▁] instead of sentencepiece's [▁▁, ▁]); that cannot be corrected from outside, hence this class.
/// </remarks>
internal sealed class SentencePieceBpe
{
    private readonly Dictionary<string, int> _pieceIds;
    private readonly Dictionary<string, int>.AlternateLookup<ReadOnlySpan<char>> _pieceLookup;
    private readonly Dictionary<string, int> _mergeablePieceIds;
    private readonly Dictionary<string, int>.AlternateLookup<ReadOnlySpan<char>> _mergeableLookup;
    private readonly float[] _scores;
    private readonly SentencePieceType[] _types;
    private readonly int _unknownId;
    private readonly int[]? _byteIds;

    public SentencePieceBpe(SentencePieceModel model, string sourceName)
    {
        _scores = model.Scores;
        _types = model.Types;
        _pieceIds = new Dictionary<string, int>(model.Pieces.Length, StringComparer.Ordinal);
        _mergeablePieceIds = new Dictionary<string, int>(model.Pieces.Length, StringComparer.Ordinal);
        _unknownId = -1;
        for (int id = 0; id < model.Pieces.Length; id++)
        {
            string piece = model.Pieces[id];
            if (!_pieceIds.TryAdd(piece, id))
            {
                throw new InvalidDataException($"Tokenizer model '{sourceName}' lists piece '{piece}' twice.");
            }

            // As in sentencepiece, merges may only produce normal, user-defined or unused pieces.
            if (_types[id] is SentencePieceType.Normal or SentencePieceType.UserDefined or SentencePieceType.Unused)
            {
                _mergeablePieceIds.Add(piece, id);
            }
            else if (_types[id] == SentencePieceType.Unknown && _unknownId < 0)
            {
                _unknownId = id;
            }
        }

        if (_unknownId < 0)
        {
            throw new InvalidDataException($"Tokenizer model '{sourceName}' has no piece of type UNKNOWN.");
        }

        if (model.ByteFallback)
        {
            _byteIds = new int[256];
            for (int value = 0; value < 256; value++)
            {
                string piece = $"<0x{value:X2}>";
                _byteIds[value] = _pieceIds.TryGetValue(piece, out int id) && _types[id] == SentencePieceType.Byte
                    ? id
                    : throw new InvalidDataException($"Tokenizer model '{sourceName}' uses byte fallback but has no byte piece '{piece}'.");
            }
        }

        _pieceLookup = _pieceIds.GetAlternateLookup<ReadOnlySpan<char>>();
        _mergeableLookup = _mergeablePieceIds.GetAlternateLookup<ReadOnlySpan<char>>();
    }

    /// <summary>Id of a piece of any type (the vocabulary of the model).</summary>
    public bool TryGetPieceId(ReadOnlySpan<char> piece, out int id) => _pieceLookup.TryGetValue(piece, out id);

    /// <summary>Appends the ids of <paramref name="text"/> to <paramref name="ids"/>.</summary>
    public void Encode(ReadOnlySpan<char> text, List<int> ids)
    {
        if (text.IsEmpty)
        {
            return;
        }

        Symbol[] symbols = ArrayPool<Symbol>.Shared.Rent(text.Length);
        try
        {
            int symbolCount = 0;
            for (int start = 0; start < text.Length;)
            {
                // One symbol per Unicode character (a surrogate pair stays together).
                int length = char.IsHighSurrogate(text[start]) && start + 1 < text.Length && char.IsLowSurrogate(text[start + 1]) ? 2 : 1;
                symbols[symbolCount] = new Symbol(start, length, symbolCount - 1, start + length < text.Length ? symbolCount + 1 : -1);
                symbolCount++;
                start += length;
            }

            var agenda = new PriorityQueue<Candidate, Candidate>(symbolCount, CandidatePriority.Instance);
            Dictionary<string, (string Left, string Right)>? unusedMerges = null;
            for (int i = 1; i < symbolCount; i++)
            {
                TryAddCandidate(text, symbols, i - 1, i, agenda, ref unusedMerges);
            }

            while (agenda.TryDequeue(out Candidate top, out _))
            {
                ref Symbol left = ref symbols[top.Left];
                ref Symbol right = ref symbols[top.Right];

                // Skip candidates made stale by an earlier merge of either side.
                if (left.Length == 0 || right.Length == 0 || left.Length + right.Length != top.Length)
                {
                    continue;
                }

                left.Length += right.Length;
                left.Next = right.Next;
                if (right.Next >= 0)
                {
                    symbols[right.Next].Prev = top.Left;
                }

                right.Length = 0;

                TryAddCandidate(text, symbols, left.Prev, top.Left, agenda, ref unusedMerges);
                TryAddCandidate(text, symbols, top.Left, left.Next, agenda, ref unusedMerges);
            }

            bool lastWasUnknown = false;
            for (int index = 0; index >= 0; index = symbols[index].Next)
            {
                EmitPiece(text.Slice(symbols[index].Start, symbols[index].Length), unusedMerges, ids, ref lastWasUnknown);
            }
        }
        finally
        {
            ArrayPool<Symbol>.Shared.Return(symbols);
        }
    }

    private void TryAddCandidate(
        ReadOnlySpan<char> text,
        Symbol[] symbols,
        int left,
        int right,
        PriorityQueue<Candidate, Candidate> agenda,
        ref Dictionary<string, (string Left, string Right)>? unusedMerges)
    {
        if (left < 0 || right < 0)
        {
            return;
        }

        int start = symbols[left].Start;
        int length = symbols[left].Length + symbols[right].Length;
        if (!_mergeableLookup.TryGetValue(text.Slice(start, length), out int id))
        {
            return;
        }

        var candidate = new Candidate(left, right, length, _scores[id]);
        agenda.Enqueue(candidate, candidate);

        // Unused pieces may be formed as intermediate steps but are split back into their parts on output; like
        // sentencepiece, the split is remembered per piece text (the last one recorded wins).
        if (_types[id] == SentencePieceType.Unused)
        {
            unusedMerges ??= new Dictionary<string, (string Left, string Right)>(StringComparer.Ordinal);
            unusedMerges[text.Slice(start, length).ToString()] =
                (text.Slice(start, symbols[left].Length).ToString(), text.Slice(symbols[right].Start, symbols[right].Length).ToString());
        }
    }

    private void EmitPiece(
        ReadOnlySpan<char> piece,
        Dictionary<string, (string Left, string Right)>? unusedMerges,
        List<int> ids,
        ref bool lastWasUnknown)
    {
        int id = _pieceLookup.TryGetValue(piece, out int found) ? found : _unknownId;

        if (_types[id] == SentencePieceType.Unused && unusedMerges is not null &&
            unusedMerges.GetAlternateLookup<ReadOnlySpan<char>>().TryGetValue(piece, out (string Left, string Right) parts))
        {
            EmitPiece(parts.Left, unusedMerges, ids, ref lastWasUnknown);
            EmitPiece(parts.Right, unusedMerges, ids, ref lastWasUnknown);
            return;
        }

        if (id != _unknownId)
        {
            ids.Add(id);
            lastWasUnknown = false;
        }
        else if (_byteIds is not null)
        {
            // Merges only produce known pieces, so an unknown piece is a single character (at most 4 UTF-8 bytes).
            Span<byte> utf8 = stackalloc byte[8];
            int byteCount = Encoding.UTF8.GetBytes(piece, utf8);
            foreach (byte value in utf8[..byteCount])
            {
                ids.Add(_byteIds[value]);
            }

            lastWasUnknown = false;
        }
        else if (!lastWasUnknown)
        {
            // Without byte fallback, sentencepiece folds consecutive unknown pieces into one.
            ids.Add(_unknownId);
            lastWasUnknown = true;
        }
    }

    private record struct Symbol(int Start, int Length, int Prev, int Next);

    private readonly record struct Candidate(int Left, int Right, int Length, float Score);

    /// <summary>Highest score first; among equal scores the leftmost pair first.</summary>
    private sealed class CandidatePriority : IComparer<Candidate>
    {
        public static readonly CandidatePriority Instance = new();

        public int Compare(Candidate x, Candidate y)
        {
            int byScore = y.Score.CompareTo(x.Score);
            return byScore != 0 ? byScore : x.Left.CompareTo(y.Left);
        }
    }
}
