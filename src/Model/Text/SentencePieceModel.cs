using System.Buffers.Binary;
using System.Text;

namespace PaliGemma.CpuOnly.Model.Text;

/// <summary>The piece kinds of sentencepiece_model.proto (ModelProto.SentencePiece.Type).</summary>
internal enum SentencePieceType : byte
{
    Normal = 1,
    Unknown = 2,
    Control = 3,
    UserDefined = 4,
    Unused = 5,
    Byte = 6,
}

/// <summary>
/// The parts of a SentencePiece <c>ModelProto</c> that the tokenizer needs: the pieces with scores and kinds, and the
/// trainer/normalizer flags that decide whether the model can be reproduced. The protobuf wire format is read directly
/// (it is small and stable), with no generated code or reflection.
/// </summary>
internal sealed class SentencePieceModel
{
    // TrainerSpec.ModelType values.
    internal const int ModelTypeUnigram = 1;
    internal const int ModelTypeBpe = 2;

    private SentencePieceModel(string[] pieces, float[] scores, SentencePieceType[] types)
    {
        Pieces = pieces;
        Scores = scores;
        Types = types;
    }

    public string[] Pieces { get; }

    /// <summary>Per piece; for BPE the merge priority (higher merges first).</summary>
    public float[] Scores { get; }

    public SentencePieceType[] Types { get; }

    // Defaults are the proto2 defaults of sentencepiece_model.proto.
    public int ModelType { get; private set; } = ModelTypeUnigram;

    public bool ByteFallback { get; private set; }

    public bool TreatWhitespaceAsSuffix { get; private set; }

    public string NormalizerName { get; private set; } = "";

    public bool HasPrecompiledCharsMap { get; private set; }

    public bool AddDummyPrefix { get; private set; } = true;

    public bool RemoveExtraWhitespaces { get; private set; } = true;

    public bool EscapeWhitespaces { get; private set; } = true;

    /// <summary>Parses a serialized ModelProto; throws <see cref="InvalidDataException"/> on malformed data.</summary>
    public static SentencePieceModel Parse(ReadOnlySpan<byte> data)
    {
        var pieces = new List<string>();
        var scores = new List<float>();
        var types = new List<SentencePieceType>();
        var trainer = ReadOnlySpan<byte>.Empty;
        var normalizer = ReadOnlySpan<byte>.Empty;

        var reader = new ProtoReader(data);
        while (reader.TryReadTag(out int field, out int wireType))
        {
            switch (field)
            {
                case 1 when wireType == ProtoReader.LengthDelimited: // repeated SentencePiece pieces
                    ReadPiece(reader.ReadBytes(), pieces, scores, types);
                    break;
                case 2 when wireType == ProtoReader.LengthDelimited: // TrainerSpec
                    trainer = reader.ReadBytes();
                    break;
                case 3 when wireType == ProtoReader.LengthDelimited: // NormalizerSpec
                    normalizer = reader.ReadBytes();
                    break;
                default:
                    reader.Skip(wireType);
                    break;
            }
        }

        if (pieces.Count == 0)
        {
            throw new InvalidDataException("the SentencePiece model has no pieces.");
        }

        var model = new SentencePieceModel(pieces.ToArray(), scores.ToArray(), types.ToArray());
        model.ReadTrainerSpec(trainer);
        model.ReadNormalizerSpec(normalizer);
        return model;
    }

    private static void ReadPiece(ReadOnlySpan<byte> message, List<string> pieces, List<float> scores, List<SentencePieceType> types)
    {
        string? piece = null;
        float score = 0;
        var type = SentencePieceType.Normal;
        var reader = new ProtoReader(message);
        while (reader.TryReadTag(out int field, out int wireType))
        {
            if (field == 1 && wireType == ProtoReader.LengthDelimited)
            {
                piece = ProtoReader.DecodeUtf8(reader.ReadBytes());
            }
            else if (field == 2 && wireType == ProtoReader.Fixed32)
            {
                score = reader.ReadFloat();
            }
            else if (field == 3 && wireType == ProtoReader.Varint)
            {
                ulong value = reader.ReadVarint();
                if (value is < 1 or > 6)
                {
                    throw new InvalidDataException($"piece {pieces.Count} has unknown type {value}.");
                }

                type = (SentencePieceType)value;
            }
            else
            {
                reader.Skip(wireType);
            }
        }

        if (string.IsNullOrEmpty(piece))
        {
            throw new InvalidDataException($"piece {pieces.Count} has no text.");
        }

        pieces.Add(piece);
        scores.Add(score);
        types.Add(type);
    }

    private void ReadTrainerSpec(ReadOnlySpan<byte> message)
    {
        var reader = new ProtoReader(message);
        while (reader.TryReadTag(out int field, out int wireType))
        {
            switch (field)
            {
                case 3 when wireType == ProtoReader.Varint:
                    ModelType = (int)reader.ReadVarint();
                    break;
                case 24 when wireType == ProtoReader.Varint:
                    TreatWhitespaceAsSuffix = reader.ReadVarint() != 0;
                    break;
                case 35 when wireType == ProtoReader.Varint:
                    ByteFallback = reader.ReadVarint() != 0;
                    break;
                default:
                    reader.Skip(wireType);
                    break;
            }
        }
    }

    private void ReadNormalizerSpec(ReadOnlySpan<byte> message)
    {
        var reader = new ProtoReader(message);
        while (reader.TryReadTag(out int field, out int wireType))
        {
            switch (field)
            {
                case 1 when wireType == ProtoReader.LengthDelimited:
                    NormalizerName = ProtoReader.DecodeUtf8(reader.ReadBytes());
                    break;
                case 2 when wireType == ProtoReader.LengthDelimited:
                    HasPrecompiledCharsMap = !reader.ReadBytes().IsEmpty;
                    break;
                case 3 when wireType == ProtoReader.Varint:
                    AddDummyPrefix = reader.ReadVarint() != 0;
                    break;
                case 4 when wireType == ProtoReader.Varint:
                    RemoveExtraWhitespaces = reader.ReadVarint() != 0;
                    break;
                case 5 when wireType == ProtoReader.Varint:
                    EscapeWhitespaces = reader.ReadVarint() != 0;
                    break;
                default:
                    reader.Skip(wireType);
                    break;
            }
        }
    }

    /// <summary>Minimal protobuf wire-format reader (varint, fixed32/64, length-delimited).</summary>
    private ref struct ProtoReader
    {
        public const int Varint = 0;
        public const int Fixed64 = 1;
        public const int LengthDelimited = 2;
        public const int Fixed32 = 5;

        private static readonly UTF8Encoding StrictUtf8 = new(encoderShouldEmitUTF8Identifier: false, throwOnInvalidBytes: true);

        private readonly ReadOnlySpan<byte> _data;
        private int _position;

        public ProtoReader(ReadOnlySpan<byte> data)
        {
            _data = data;
            _position = 0;
        }

        public bool TryReadTag(out int field, out int wireType)
        {
            if (_position >= _data.Length)
            {
                field = 0;
                wireType = 0;
                return false;
            }

            ulong tag = ReadVarint();
            field = (int)(tag >> 3);
            wireType = (int)(tag & 7);
            if (field <= 0 || tag >> 3 > int.MaxValue)
            {
                throw new InvalidDataException($"invalid protobuf field number at byte {_position}.");
            }

            return true;
        }

        public ulong ReadVarint()
        {
            ulong result = 0;
            for (int shift = 0; shift < 64; shift += 7)
            {
                if (_position >= _data.Length)
                {
                    throw new InvalidDataException("truncated protobuf varint.");
                }

                byte b = _data[_position++];
                result |= (ulong)(b & 0x7F) << shift;
                if (b < 0x80)
                {
                    return result;
                }
            }

            throw new InvalidDataException("protobuf varint longer than 10 bytes.");
        }

        public float ReadFloat()
        {
            if (_data.Length - _position < 4)
            {
                throw new InvalidDataException("truncated protobuf float.");
            }

            float value = BinaryPrimitives.ReadSingleLittleEndian(_data[_position..]);
            _position += 4;
            return value;
        }

        public ReadOnlySpan<byte> ReadBytes()
        {
            ulong length = ReadVarint();
            if (length > (ulong)(_data.Length - _position))
            {
                throw new InvalidDataException($"protobuf field of {length} bytes runs past the end of its message.");
            }

            ReadOnlySpan<byte> bytes = _data.Slice(_position, (int)length);
            _position += (int)length;
            return bytes;
        }

        public void Skip(int wireType)
        {
            int size = wireType switch
            {
                Varint => -1,
                Fixed64 => 8,
                LengthDelimited => -2,
                Fixed32 => 4,
                _ => throw new InvalidDataException($"unsupported protobuf wire type {wireType}."),
            };

            if (size == -1)
            {
                ReadVarint();
            }
            else if (size == -2)
            {
                ReadBytes();
            }
            else if (_data.Length - _position < size)
            {
                throw new InvalidDataException("truncated protobuf fixed-size field.");
            }
            else
            {
                _position += size;
            }
        }

        public static string DecodeUtf8(ReadOnlySpan<byte> bytes)
        {
            try
            {
                return StrictUtf8.GetString(bytes);
            }
            catch (DecoderFallbackException ex)
            {
                throw new InvalidDataException("protobuf string is not valid UTF-8.", ex);
            }
        }
    }
}
