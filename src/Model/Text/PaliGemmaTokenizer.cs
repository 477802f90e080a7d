using System.Globalization;
using System.Text;

namespace PaliGemma.CpuOnly.Model.Text;

/// <summary>
/// The PaliGemma tokenizer: a SentencePiece BPE model (Gemma's, plus <c>&lt;loc&gt;</c>/<c>&lt;seg&gt;</c>/<c>&lt;image&gt;</c>
/// pieces) that reproduces the ids of Hugging Face's <c>GemmaTokenizer</c> as set up by <c>PaliGemmaProcessor</c>
/// (transformers 4.45.1).
/// </summary>
/// <remarks>
/// <para>
/// Encoding follows the Hugging Face slow tokenizer: the text is cut at added tokens (control, unknown and
/// user-defined pieces, longest match first), and each piece of text between them is encoded by SentencePiece BPE
/// with byte fallback (<see cref="SentencePieceBpe"/>; Microsoft.ML.Tokenizers 2.0.1 is not used because its BPE
/// breaks equal-score ties differently from sentencepiece). Decoding follows Hugging Face too: control and user-defined
/// tokens decode to their own text (<c>&lt;bos&gt;</c> stays <c>"&lt;bos&gt;"</c>), and byte runs decode as
/// sentencepiece does (one U+FFFD per byte that does not start a well-formed UTF-8 sequence).
/// </para>
/// <para>
/// Special ids are found by piece name. Processor tokens missing from the model get the next ids after the model's
/// pieces, in the order <c>PaliGemmaProcessor</c> adds them: a 257152-piece Gemma+loc+seg model without an
/// <c>&lt;image&gt;</c> piece gets <c>&lt;image&gt;</c> = 257152, the <c>image_token_index</c> of the released configs.
/// </para>
/// </remarks>
public sealed class PaliGemmaTokenizer
{
    private const char WhitespaceSymbol = '\u2581';
    private const string ImageToken = "<image>";
    private const string BosToken = "<bos>";
    private const string EosToken = "<eos>";
    private const string PadToken = "<pad>";
    private const int LocationTokenCount = 1024;
    private const int SegmentTokenCount = 128;

    private readonly SentencePieceBpe _bpe;
    private readonly string[] _tokens;            // model pieces, then the processor tokens the model lacks
    private readonly SentencePieceType[] _types;  // per model piece
    private readonly byte[] _byteValues;          // per model piece; meaningful for Byte pieces only
    private readonly Dictionary<string, int> _appendedTokenIds; // processor tokens the model lacks
    private readonly LiteralTokenMatcher _literalTokens;
    private readonly bool _escapeWhitespaces;

    private PaliGemmaTokenizer(SentencePieceModel model, string sourceName)
    {
        _bpe = new SentencePieceBpe(model, sourceName);
        _types = model.Types;
        _escapeWhitespaces = model.EscapeWhitespaces;
        PieceCount = model.Pieces.Length;

        var tokens = new List<string>(model.Pieces);
        _appendedTokenIds = new Dictionary<string, int>(StringComparer.Ordinal);
        _byteValues = new byte[PieceCount];
        for (int id = 0; id < PieceCount; id++)
        {
            if (_types[id] == SentencePieceType.Byte)
            {
                _byteValues[id] = ParseBytePiece(model.Pieces[id], id, sourceName);
            }
        }

        // PaliGemmaProcessor adds "<image>" and then the <locNNNN>/<segNNN> tokens; those already in the model keep
        // their ids, the others are appended in that order.
        foreach (string token in ProcessorTokens())
        {
            if (!_bpe.TryGetPieceId(token, out _))
            {
                _appendedTokenIds.Add(token, tokens.Count);
                tokens.Add(token);
            }
        }

        _tokens = tokens.ToArray();

        // Text that is never given to BPE: the pieces that Hugging Face registers as added tokens (control, unknown,
        // user-defined) and the appended processor tokens.
        _literalTokens = new LiteralTokenMatcher();
        for (int id = 0; id < _tokens.Length; id++)
        {
            if (id >= PieceCount || _types[id] is SentencePieceType.Control or SentencePieceType.Unknown or SentencePieceType.UserDefined)
            {
                _literalTokens.Add(_tokens[id], id);
            }
        }

        BosId = RequireToken(BosToken, sourceName);
        EosId = RequireToken(EosToken, sourceName);
        PadId = RequireToken(PadToken, sourceName);
        ImageTokenId = RequireToken(ImageToken, sourceName);
    }

    /// <summary>Id of <c>&lt;bos&gt;</c>.</summary>
    public int BosId { get; }

    /// <summary>Id of <c>&lt;eos&gt;</c>.</summary>
    public int EosId { get; }

    /// <summary>Id of <c>&lt;pad&gt;</c>.</summary>
    public int PadId { get; }

    /// <summary>Id of <c>&lt;image&gt;</c>.</summary>
    public int ImageTokenId { get; }

    /// <summary>Number of pieces in the SentencePiece model.</summary>
    public int PieceCount { get; }

    /// <summary>Number of valid token ids: the model's pieces plus the processor tokens appended after them.</summary>
    internal int VocabularySize => _tokens.Length;

    /// <summary>Loads a SentencePiece <c>tokenizer.model</c> file.</summary>
    /// <exception cref="FileNotFoundException">The file does not exist.</exception>
    /// <exception cref="InvalidDataException">The file is not a valid SentencePiece model.</exception>
    /// <exception cref="NotSupportedException">The model uses settings this tokenizer does not reproduce.</exception>
    public static PaliGemmaTokenizer Load(string tokenizerModelPath)
    {
        ArgumentException.ThrowIfNullOrEmpty(tokenizerModelPath);
        if (!File.Exists(tokenizerModelPath))
        {
            throw new FileNotFoundException($"Tokenizer model '{tokenizerModelPath}' was not found.", tokenizerModelPath);
        }

        using FileStream stream = File.OpenRead(tokenizerModelPath);
        return Load(stream, tokenizerModelPath);
    }

    /// <summary>Loads a serialized SentencePiece <c>ModelProto</c>; <paramref name="sourceName"/> names it in errors.</summary>
    /// <exception cref="InvalidDataException">The data is not a valid SentencePiece model.</exception>
    /// <exception cref="NotSupportedException">The model uses settings this tokenizer does not reproduce.</exception>
    public static PaliGemmaTokenizer Load(Stream modelProto, string sourceName)
    {
        ArgumentNullException.ThrowIfNull(modelProto);
        ArgumentNullException.ThrowIfNull(sourceName);

        byte[] data;
        using (var buffer = new MemoryStream())
        {
            modelProto.CopyTo(buffer);
            data = buffer.ToArray();
        }

        SentencePieceModel model;
        try
        {
            model = SentencePieceModel.Parse(data);
        }
        catch (InvalidDataException ex)
        {
            throw new InvalidDataException($"Tokenizer model '{sourceName}' is not a valid SentencePiece model: {ex.Message}", ex);
        }

        CheckSupported(model, sourceName);
        return new PaliGemmaTokenizer(model, sourceName);
    }

    /// <summary>
    /// Encodes <paramref name="text"/> without adding <c>&lt;bos&gt;</c>/<c>&lt;eos&gt;</c>. Control and user-defined
    /// tokens written in the text (<c>&lt;image&gt;</c>, <c>&lt;bos&gt;</c>, <c>&lt;loc0042&gt;</c>, ...) become single ids.
    /// </summary>
    public int[] Encode(string text)
    {
        ArgumentNullException.ThrowIfNull(text);

        // SentencePiece's identity normalizer with escape_whitespaces: only U+0020 becomes U+2581.
        string normalized = _escapeWhitespaces ? text.Replace(' ', WhitespaceSymbol) : text;
        ReadOnlySpan<char> span = normalized;

        var ids = new List<int>(span.Length / 2 + 4);
        int gapStart = 0;
        int position = 0;
        while (position < span.Length)
        {
            if (_literalTokens.TryMatch(span[position..], out int length, out int id))
            {
                _bpe.Encode(span[gapStart..position], ids);
                ids.Add(id);
                position += length;
                gapStart = position;
            }
            else
            {
                position++;
            }
        }

        _bpe.Encode(span[gapStart..], ids);
        return ids.ToArray();
    }

    /// <summary>
    /// Decodes ids like Hugging Face's <c>tokenizer.decode(ids)</c>: special tokens are kept as their text, U+2581
    /// becomes a space, and byte tokens that do not form valid UTF-8 become U+FFFD (one per byte).
    /// </summary>
    /// <remarks>
    /// Ids past the last piece decode to nothing: checkpoints pad the embedding matrix beyond the tokenizer (PaliGemma:
    /// 257216 rows for 257153 tokens), and a sampled or random model can pick such a row. Generation keeps the id.
    /// </remarks>
    /// <exception cref="ArgumentOutOfRangeException">An id is negative.</exception>
    public string Decode(ReadOnlySpan<int> ids)
    {
        var text = new StringBuilder(ids.Length * 4);
        Span<byte> initialBytes = stackalloc byte[64];
        Span<byte> pendingBytes = initialBytes;
        byte[]? grownBytes = null;
        int pendingCount = 0;

        for (int i = 0; i < ids.Length; i++)
        {
            int id = ids[i];
            if (id < 0)
            {
                throw new ArgumentOutOfRangeException(nameof(ids), id, $"Token id {id} at index {i} is negative.");
            }

            if (!IsValidId(id))
            {
                continue;   // an embedding row with no token: no text
            }

            if (TryGetByte(id, out byte value))
            {
                if (pendingCount == pendingBytes.Length)
                {
                    grownBytes = new byte[pendingBytes.Length * 2];
                    pendingBytes.CopyTo(grownBytes);
                    pendingBytes = grownBytes;
                }

                pendingBytes[pendingCount++] = value;
                continue;
            }

            ByteRunDecoder.Append(pendingBytes[..pendingCount], isFinal: true, text);
            pendingCount = 0;
            AppendTokenText(id, text);
        }

        ByteRunDecoder.Append(pendingBytes[..pendingCount], isFinal: true, text);
        return text.ToString();
    }

    /// <summary>
    /// Text of one token, equal to <c>Decode([id])</c>. A byte token that is part of a multi-byte UTF-8 character
    /// decodes to U+FFFD on its own; use <see cref="StreamingDecoder"/> to stream generated text.
    /// </summary>
    public string DecodeToken(int id) => Decode(new ReadOnlySpan<int>(in id));

    /// <summary>The piece (token text, with U+2581 for spaces) of <paramref name="id"/>, or null if there is none.</summary>
    public string? IdToPiece(int id) => IsValidId(id) ? _tokens[id] : null;

    /// <summary>The id of <paramref name="piece"/>, or null if it is not a token.</summary>
    public int? PieceToId(string piece)
    {
        ArgumentNullException.ThrowIfNull(piece);
        return TryGetTokenId(piece, out int id) ? id : null;
    }

    /// <summary>
    /// The ids of PaliGemmaProcessor's prompt: <c>"&lt;image&gt;" * numImageTokens + "&lt;bos&gt;" + prompt + "\n"</c>,
    /// tokenized as one string (the prompt and its newline are encoded together).
    /// </summary>
    public int[] BuildPrompt(string prompt, int numImageTokens)
    {
        ArgumentNullException.ThrowIfNull(prompt);
        ArgumentOutOfRangeException.ThrowIfNegative(numImageTokens);

        string imageText = _tokens[ImageTokenId];
        string bosText = _tokens[BosId];
        var text = new StringBuilder(imageText.Length * numImageTokens + bosText.Length + prompt.Length + 1);
        text.Insert(0, imageText, numImageTokens);
        text.Append(bosText).Append(prompt).Append('\n');
        return Encode(text.ToString());
    }

    /// <summary>
    /// Training-style input as PaliGemmaProcessor builds it with a suffix: the prefix of <see cref="BuildPrompt"/> and
    /// the suffix ids <c>Encode(suffix) + eos</c>. The model input is the prefix followed by the suffix.
    /// </summary>
    public (int[] Prefix, int[] Suffix) BuildPromptWithSuffix(string prompt, string suffix, int numImageTokens)
    {
        ArgumentNullException.ThrowIfNull(suffix);
        int[] prefix = BuildPrompt(prompt, numImageTokens);
        int[] suffixIds = Encode(suffix);
        Array.Resize(ref suffixIds, suffixIds.Length + 1);
        suffixIds[^1] = EosId;
        return (prefix, suffixIds);
    }

    /// <summary>
    /// Left-pads sequences to the longest one, as the processor does for a batch: pads get <paramref name="padId"/> and
    /// mask 0, tokens mask 1.
    /// </summary>
    public static (int[,] Ids, byte[,] Mask) PadLeft(IReadOnlyList<int[]> sequences, int padId)
    {
        ArgumentNullException.ThrowIfNull(sequences);

        int width = 0;
        for (int row = 0; row < sequences.Count; row++)
        {
            int[] sequence = sequences[row] ?? throw new ArgumentException($"Sequence {row} is null.", nameof(sequences));
            width = Math.Max(width, sequence.Length);
        }

        var ids = new int[sequences.Count, width];
        var mask = new byte[sequences.Count, width];
        for (int row = 0; row < sequences.Count; row++)
        {
            int[] sequence = sequences[row];
            int padding = width - sequence.Length;
            for (int column = 0; column < padding; column++)
            {
                ids[row, column] = padId;
            }

            for (int column = 0; column < sequence.Length; column++)
            {
                ids[row, padding + column] = sequence[column];
                mask[row, padding + column] = 1;
            }
        }

        return (ids, mask);
    }

    internal bool IsValidId(int id) => (uint)id < (uint)_tokens.Length;

    internal bool TryGetByte(int id, out byte value)
    {
        if (id < PieceCount && _types[id] == SentencePieceType.Byte)
        {
            value = _byteValues[id];
            return true;
        }

        value = 0;
        return false;
    }

    /// <summary>Appends the text of a non-byte token (U+2581 as space).</summary>
    internal void AppendTokenText(int id, StringBuilder destination)
    {
        foreach (char c in _tokens[id])
        {
            destination.Append(c == WhitespaceSymbol ? ' ' : c);
        }
    }

    private bool TryGetTokenId(string token, out int id) =>
        _bpe.TryGetPieceId(token, out id) || _appendedTokenIds.TryGetValue(token, out id);

    private int RequireToken(string token, string sourceName) =>
        TryGetTokenId(token, out int id)
            ? id
            : throw new InvalidDataException($"Tokenizer model '{sourceName}' has no '{token}' piece.");

    private static IEnumerable<string> ProcessorTokens()
    {
        yield return ImageToken;
        for (int i = 0; i < LocationTokenCount; i++)
        {
            yield return string.Create(CultureInfo.InvariantCulture, $"<loc{i:D4}>");
        }

        for (int i = 0; i < SegmentTokenCount; i++)
        {
            yield return string.Create(CultureInfo.InvariantCulture, $"<seg{i:D3}>");
        }
    }

    private static byte ParseBytePiece(string piece, int id, string sourceName)
    {
        // Byte pieces are spelled "<0xNN>".
        if (piece.Length == 6 && piece.StartsWith("<0x", StringComparison.Ordinal) && piece[5] == '>' &&
            byte.TryParse(piece.AsSpan(3, 2), NumberStyles.AllowHexSpecifier, CultureInfo.InvariantCulture, out byte value))
        {
            return value;
        }

        throw new InvalidDataException($"Tokenizer model '{sourceName}': byte piece {id} is '{piece}', expected '<0xNN>'.");
    }

    private static void CheckSupported(SentencePieceModel model, string sourceName)
    {
        // These are the settings of Gemma's model; other settings change encoding or decoding in ways not reproduced here.
        string? problem =
            model.ModelType != SentencePieceModel.ModelTypeBpe ? $"model type {model.ModelType} (only BPE, type 2, is supported)"
            : model.HasPrecompiledCharsMap ? $"normalizer '{model.NormalizerName}' (only the identity normalizer is supported)"
            : model.AddDummyPrefix ? "add_dummy_prefix = true"
            : model.RemoveExtraWhitespaces ? "remove_extra_whitespaces = true"
            : model.TreatWhitespaceAsSuffix ? "treat_whitespace_as_suffix = true"
            : null;

        if (problem is not null)
        {
            throw new NotSupportedException($"Tokenizer model '{sourceName}' uses {problem}; PaliGemma's tokenizer does not.");
        }
    }
}
