namespace PaliGemma.CpuOnly.Model.Imaging;

/// <summary>
/// A JPEG decoder that produces the pixels PIL gets from libjpeg-turbo with its default settings: Huffman-coded
/// baseline, extended and progressive 8-bit images, the integer "islow" IDCT, "fancy" (triangular) chroma upsampling
/// and libjpeg's fixed-point YCbCr to RGB conversion.
/// </summary>
/// <remarks>
/// Other JPEG variants (CMYK/YCCK, 12-bit samples, arithmetic coding, lossless, missing Huffman tables, DNL heights,
/// non-integral sampling ratios) make <see cref="TryDecode"/> return null so that the caller can fall back to a general
/// decoder. Malformed data throws <see cref="InvalidDataException"/>. Like libjpeg, a scan cut short by a marker decodes
/// the rest of its blocks from zero bits; like PIL, a file that ends before its end-of-image marker is an error.
/// </remarks>
internal sealed class PilJpegDecoder
{
    /// <summary>Zig-zag order to natural order, with 16 extra entries so corrupt run lengths land on the last coefficient as in libjpeg.</summary>
    private static readonly byte[] s_naturalOrder =
    [
        0, 1, 8, 16, 9, 2, 3, 10, 17, 24, 32, 25, 18, 11, 4, 5,
        12, 19, 26, 33, 40, 48, 41, 34, 27, 20, 13, 6, 7, 14, 21, 28,
        35, 42, 49, 56, 57, 50, 43, 36, 29, 22, 15, 23, 30, 37, 44, 51,
        58, 59, 52, 45, 38, 31, 39, 46, 53, 60, 61, 54, 47, 55, 62, 63,
        63, 63, 63, 63, 63, 63, 63, 63, 63, 63, 63, 63, 63, 63, 63, 63,
    ];

    private readonly byte[] _data;
    private int _position;

    private readonly int[]?[] _quantizationTables = new int[4][];
    private readonly JpegHuffmanTable?[] _dcTables = new JpegHuffmanTable[4];
    private readonly JpegHuffmanTable?[] _acTables = new JpegHuffmanTable[4];
    private int _restartInterval;
    private bool _sawJfif;
    private bool _sawAdobe;
    private int _adobeTransform;

    private Component[]? _components;
    private int _width;
    private int _height;
    private int _maxH;
    private int _maxV;
    private int _mcusPerLine;
    private int _mcusPerColumn;
    private bool _progressive;

    // Entropy-coded segment reader: bits are taken from the top of _bits.
    private uint _bits;
    private int _bitCount;
    private bool _hitMarker;
    private int _bytesPastEnd;
    private int _endOfBandRun;

    private PilJpegDecoder(byte[] data) => _data = data;

    /// <summary>Decodes a JPEG, or returns null if it uses a feature this decoder leaves to ImageSharp.</summary>
    /// <exception cref="InvalidDataException">The data is malformed or truncated.</exception>
    public static RgbImage? TryDecode(byte[] data) => new PilJpegDecoder(data).Decode();

    private RgbImage? Decode()
    {
        if (_data.Length < 4 || _data[0] != 0xFF || _data[1] != 0xD8)
        {
            throw new InvalidDataException("the data does not start with a JPEG SOI marker.");
        }

        _position = 2;
        int scans = 0;
        bool sawEndOfImage = false;
        while (!sawEndOfImage)
        {
            int marker = NextMarker();
            if (marker < 0)
            {
                break;
            }

            switch (marker)
            {
                case 0xC0: // baseline
                case 0xC1: // extended sequential, Huffman
                case 0xC2: // progressive, Huffman
                    if (!ReadFrame(ReadSegment(), progressive: marker == 0xC2))
                    {
                        return null;
                    }

                    break;
                case 0xC3 or >= 0xC5 and <= 0xC7 or >= 0xC9 and <= 0xCB or >= 0xCD and <= 0xCF or 0xCC or 0xDC:
                    return null; // lossless, hierarchical, arithmetic coding, DNL
                case 0xC4:
                    ReadHuffmanTables(ReadSegment());
                    break;
                case 0xDB:
                    ReadQuantizationTables(ReadSegment());
                    break;
                case 0xDD:
                    ReadOnlySpan<byte> restart = ReadSegment();
                    _restartInterval = restart.Length >= 2 ? restart[0] << 8 | restart[1] : throw Corrupt("a DRI segment is too short");
                    break;
                case 0xDA:
                    if (_components is null)
                    {
                        throw Corrupt("a scan starts before the frame header (SOF)");
                    }

                    if (!ReadScan(ReadSegment()))
                    {
                        return null;
                    }

                    scans++;
                    break;
                case 0xD9:
                    sawEndOfImage = true;
                    break;
                case 0xD8:
                    throw Corrupt("a second SOI marker appears inside the image");
                case >= 0xD0 and <= 0xD7:
                    break; // stray restart marker: libjpeg ignores it too
                case 0xE0:
                    ReadOnlySpan<byte> app0 = ReadSegment();
                    _sawJfif |= app0.Length >= 5 && app0[..5].SequenceEqual("JFIF\0"u8);
                    break;
                case 0xEE:
                    ReadOnlySpan<byte> app14 = ReadSegment();
                    if (app14.Length >= 12 && app14[..5].SequenceEqual("Adobe"u8))
                    {
                        _sawAdobe = true;
                        _adobeTransform = app14[11];
                    }

                    break;
                default:
                    ReadSegment(); // APPn, COM and others carry nothing the pixels depend on
                    break;
            }
        }

        if (_components is null || scans == 0)
        {
            throw Corrupt("the data ends before any image scan");
        }

        if (!sawEndOfImage)
        {
            // PIL reports a JPEG without its end-of-image marker as truncated, even when the scans are complete.
            throw Corrupt("the data ends before the end-of-image marker (truncated file)");
        }

        return Output();
    }

    private bool ReadFrame(ReadOnlySpan<byte> segment, bool progressive)
    {
        if (_components is not null)
        {
            throw Corrupt("the file has more than one frame header");
        }

        if (segment.Length < 6)
        {
            throw Corrupt("the frame header is too short");
        }

        int precision = segment[0];
        _height = segment[1] << 8 | segment[2];
        _width = segment[3] << 8 | segment[4];
        int componentCount = segment[5];
        if (precision != 8 || _height == 0 || (componentCount != 1 && componentCount != 3))
        {
            return false; // 12-bit, height defined later by DNL, CMYK/YCCK or unusual component counts
        }

        if (_width == 0 || segment.Length < 6 + 3 * componentCount)
        {
            throw Corrupt("the frame header is malformed");
        }

        var components = new Component[componentCount];
        for (int i = 0; i < componentCount; i++)
        {
            ReadOnlySpan<byte> entry = segment.Slice(6 + 3 * i, 3);
            int h = entry[1] >> 4, v = entry[1] & 15, table = entry[2];
            if (h is < 1 or > 4 || v is < 1 or > 4 || table > 3)
            {
                throw Corrupt($"component {i} has sampling factors {h}x{v} or quantization table {table}, outside the allowed range");
            }

            components[i] = new Component(entry[0], h, v, table);
        }

        _maxH = components.Max(c => c.H);
        _maxV = components.Max(c => c.V);
        if (components.Any(c => _maxH % c.H != 0 || _maxV % c.V != 0))
        {
            return false; // libjpeg implements integral upsampling ratios only
        }

        _progressive = progressive;
        _mcusPerLine = DivideRoundingUp(_width, 8 * _maxH);
        _mcusPerColumn = DivideRoundingUp(_height, 8 * _maxV);
        foreach (Component component in components)
        {
            component.Width = DivideRoundingUp(_width * component.H, _maxH);
            component.Height = DivideRoundingUp(_height * component.V, _maxV);
            component.UsedBlocksPerLine = DivideRoundingUp(component.Width, 8);
            component.UsedBlocksPerColumn = DivideRoundingUp(component.Height, 8);
            component.BlocksPerLine = _mcusPerLine * component.H;
            component.BlocksPerColumn = _mcusPerColumn * component.V;
            component.Coefficients = new short[checked(component.BlocksPerLine * component.BlocksPerColumn * 64)];
        }

        _components = components;
        return true;
    }

    private void ReadHuffmanTables(ReadOnlySpan<byte> segment)
    {
        while (!segment.IsEmpty)
        {
            if (segment.Length < 17)
            {
                throw Corrupt("a Huffman table (DHT) is too short");
            }

            int tableClass = segment[0] >> 4, id = segment[0] & 15;
            ReadOnlySpan<byte> counts = segment.Slice(1, 16);
            int total = 0;
            foreach (byte count in counts)
            {
                total += count;
            }

            if (tableClass > 1 || id > 3 || total > 256 || segment.Length < 17 + total)
            {
                throw Corrupt("a Huffman table (DHT) is malformed");
            }

            var table = new JpegHuffmanTable(counts, segment.Slice(17, total));
            (tableClass == 0 ? _dcTables : _acTables)[id] = table;
            segment = segment[(17 + total)..];
        }
    }

    private void ReadQuantizationTables(ReadOnlySpan<byte> segment)
    {
        while (!segment.IsEmpty)
        {
            int precision = segment[0] >> 4, id = segment[0] & 15;
            int length = precision == 0 ? 64 : 128;
            if (precision > 1 || id > 3 || segment.Length < 1 + length)
            {
                throw Corrupt("a quantization table (DQT) is malformed");
            }

            var table = new int[64];
            for (int k = 0; k < 64; k++)
            {
                int value = precision == 0 ? segment[1 + k] : segment[1 + 2 * k] << 8 | segment[2 + 2 * k];
                // libjpeg-turbo keeps multipliers as 16-bit signed integers in its SIMD builds (what PIL ships).
                table[s_naturalOrder[k]] = (short)value;
            }

            _quantizationTables[id] = table;
            segment = segment[(1 + length)..];
        }
    }

    private bool ReadScan(ReadOnlySpan<byte> header)
    {
        int count = header.Length > 0 ? header[0] : 0;
        if (count is < 1 or > 4 || header.Length < 4 + 2 * count)
        {
            throw Corrupt("a scan header (SOS) is malformed");
        }

        var scanComponents = new Component[count];
        for (int i = 0; i < count; i++)
        {
            int id = header[1 + 2 * i], tables = header[2 + 2 * i];
            Component component = Array.Find(_components!, c => c.Id == id)
                ?? throw Corrupt($"a scan refers to component {id}, which the frame does not have");
            component.DcTable = tables >> 4;
            component.AcTable = tables & 15;
            if (component.DcTable > 3 || component.AcTable > 3)
            {
                throw Corrupt("a scan selects a Huffman table outside 0..3");
            }

            scanComponents[i] = component;
        }

        int spectralStart = header[1 + 2 * count];
        int spectralEnd = header[2 + 2 * count];
        int successiveHigh = header[3 + 2 * count] >> 4;
        int successiveLow = header[3 + 2 * count] & 15;
        if (!_progressive)
        {
            (spectralStart, spectralEnd, successiveHigh, successiveLow) = (0, 63, 0, 0);
        }
        else if (spectralEnd > 63 || spectralStart > spectralEnd || (spectralStart == 0 && spectralEnd != 0)
            || (spectralStart > 0 && count != 1) || successiveLow > 13)
        {
            throw Corrupt("a progressive scan has an invalid spectral selection or approximation");
        }

        // Tables this scan will read; libjpeg-turbo would substitute the standard tables, ImageSharp handles that case.
        foreach (Component component in scanComponents)
        {
            bool needsDc = spectralStart == 0 && successiveHigh == 0;
            bool needsAc = spectralEnd > 0;
            if ((needsDc && _dcTables[component.DcTable] is null) || (needsAc && _acTables[component.AcTable] is null))
            {
                return false;
            }

            component.DcPrediction = 0;
        }

        DecodeScan(scanComponents, spectralStart, spectralEnd, successiveHigh, successiveLow);
        return true;
    }

    private void DecodeScan(Component[] scanComponents, int spectralStart, int spectralEnd, int successiveHigh, int successiveLow)
    {
        _bits = 0;
        _bitCount = 0;
        _hitMarker = false;
        _bytesPastEnd = 0;
        _endOfBandRun = 0;

        // A single-component scan is not interleaved: its MCU is one block and it covers only the blocks holding samples.
        Component first = scanComponents[0];
        int mcuCount = scanComponents.Length == 1
            ? first.UsedBlocksPerLine * first.UsedBlocksPerColumn
            : _mcusPerLine * _mcusPerColumn;
        for (int mcu = 0; mcu < mcuCount; mcu++)
        {
            if (_restartInterval > 0 && mcu > 0 && mcu % _restartInterval == 0)
            {
                ProcessRestart(scanComponents);
            }

            if (scanComponents.Length == 1)
            {
                int blockRow = mcu / first.UsedBlocksPerLine, blockColumn = mcu % first.UsedBlocksPerLine;
                DecodeBlock(first, blockRow * first.BlocksPerLine + blockColumn, spectralStart, spectralEnd, successiveHigh, successiveLow);
                continue;
            }

            int mcuRow = mcu / _mcusPerLine, mcuColumn = mcu % _mcusPerLine;
            foreach (Component component in scanComponents)
            {
                for (int v = 0; v < component.V; v++)
                {
                    for (int h = 0; h < component.H; h++)
                    {
                        int block = (mcuRow * component.V + v) * component.BlocksPerLine + mcuColumn * component.H + h;
                        DecodeBlock(component, block, spectralStart, spectralEnd, successiveHigh, successiveLow);
                    }
                }
            }
        }

        // Bits taken from beyond the last byte of the file mean the scan's data is missing, not merely cut by a marker.
        if (_bitCount < 8 * _bytesPastEnd)
        {
            throw Corrupt("the data ends in the middle of a scan (truncated file)");
        }

        _bits = 0;
        _bitCount = 0;
    }

    private void DecodeBlock(Component component, int blockIndex, int spectralStart, int spectralEnd, int successiveHigh, int successiveLow)
    {
        Span<short> block = component.Coefficients.AsSpan(blockIndex * 64, 64);
        if (!_progressive)
        {
            DecodeBaselineBlock(component, block);
        }
        else if (spectralStart == 0)
        {
            if (successiveHigh == 0)
            {
                int difference = DecodeDifference(_dcTables[component.DcTable]!);
                component.DcPrediction += difference;
                block[0] = (short)(component.DcPrediction << successiveLow);
            }
            else if (ReadBits(1) != 0)
            {
                block[0] |= (short)(1 << successiveLow);
            }
        }
        else if (successiveHigh == 0)
        {
            DecodeAcFirst(_acTables[component.AcTable]!, block, spectralStart, spectralEnd, successiveLow);
        }
        else
        {
            DecodeAcRefine(_acTables[component.AcTable]!, block, spectralStart, spectralEnd, successiveLow);
        }
    }

    private void DecodeBaselineBlock(Component component, Span<short> block)
    {
        component.DcPrediction += DecodeDifference(_dcTables[component.DcTable]!);
        block[0] = (short)component.DcPrediction;
        JpegHuffmanTable ac = _acTables[component.AcTable]!;
        for (int k = 1; k < 64; k++)
        {
            int symbol = DecodeSymbol(ac);
            int run = symbol >> 4, size = symbol & 15;
            if (size == 0)
            {
                if (run != 15)
                {
                    break; // end of block
                }

                k += 15; // sixteen zeros
                continue;
            }

            k += run;
            block[s_naturalOrder[k]] = (short)Extend(ReadBits(size), size);
        }
    }

    private void DecodeAcFirst(JpegHuffmanTable ac, Span<short> block, int start, int end, int shift)
    {
        if (_endOfBandRun > 0)
        {
            _endOfBandRun--;
            return;
        }

        for (int k = start; k <= end; k++)
        {
            int symbol = DecodeSymbol(ac);
            int run = symbol >> 4, size = symbol & 15;
            if (size != 0)
            {
                k += run;
                block[s_naturalOrder[k]] = (short)(Extend(ReadBits(size), size) << shift);
            }
            else if (run == 15)
            {
                k += 15;
            }
            else
            {
                _endOfBandRun = (1 << run) - 1;
                if (run > 0)
                {
                    _endOfBandRun += ReadBits(run);
                }

                break;
            }
        }
    }

    /// <summary>Successive-approximation refinement of AC coefficients (ITU T.81 G.1.2.3).</summary>
    private void DecodeAcRefine(JpegHuffmanTable ac, Span<short> block, int start, int end, int shift)
    {
        int plusOne = 1 << shift;
        int minusOne = -1 << shift;
        int k = start;
        if (_endOfBandRun == 0)
        {
            for (; k <= end; k++)
            {
                int symbol = DecodeSymbol(ac);
                int run = symbol >> 4, size = symbol & 15;
                int newValue = 0;
                if (size != 0)
                {
                    // size is 1 in valid data: one newly non-zero coefficient whose sign follows.
                    newValue = ReadBits(1) != 0 ? plusOne : minusOne;
                }
                else if (run != 15)
                {
                    _endOfBandRun = 1 << run;
                    if (run > 0)
                    {
                        _endOfBandRun += ReadBits(run);
                    }

                    break; // the rest of the band is refined below
                }

                // Skip `run` zero coefficients, refining the non-zero ones passed on the way.
                while (k <= end)
                {
                    ref short coefficient = ref block[s_naturalOrder[k]];
                    if (coefficient != 0)
                    {
                        RefineNonZero(ref coefficient, plusOne, minusOne);
                    }
                    else
                    {
                        if (run == 0)
                        {
                            break;
                        }

                        run--;
                    }

                    k++;
                }

                if (newValue != 0)
                {
                    // In corrupt data k can pass the band; the padded order table then points at coefficient 63, as in libjpeg.
                    block[s_naturalOrder[k]] = (short)newValue;
                }
            }
        }

        if (_endOfBandRun > 0)
        {
            for (; k <= end; k++)
            {
                ref short coefficient = ref block[s_naturalOrder[k]];
                if (coefficient != 0)
                {
                    RefineNonZero(ref coefficient, plusOne, minusOne);
                }
            }

            _endOfBandRun--;
        }
    }

    private void RefineNonZero(ref short coefficient, int plusOne, int minusOne)
    {
        if (ReadBits(1) != 0 && (coefficient & plusOne) == 0)
        {
            coefficient = (short)(coefficient + (coefficient >= 0 ? plusOne : minusOne));
        }
    }

    private void ProcessRestart(Component[] scanComponents)
    {
        // Discard the partial byte, then expect RSTn; like libjpeg, skip any garbage before the marker.
        _bits = 0;
        _bitCount = 0;
        if (!_hitMarker)
        {
            SkipToMarker();
        }

        if (_position + 1 < _data.Length && _data[_position] == 0xFF && _data[_position + 1] is >= 0xD0 and <= 0xD7)
        {
            _position += 2;
            _hitMarker = false;
        }

        _endOfBandRun = 0;
        foreach (Component component in scanComponents)
        {
            component.DcPrediction = 0;
        }
    }

    private int DecodeDifference(JpegHuffmanTable dc)
    {
        int size = DecodeSymbol(dc);
        if (size > 16)
        {
            throw Corrupt("a DC difference category is larger than 16");
        }

        return size == 0 ? 0 : Extend(ReadBits(size), size);
    }

    private int DecodeSymbol(JpegHuffmanTable table)
    {
        if (_bitCount < 16)
        {
            FillBits();
        }

        int entry = table.Lookup[_bits >> (32 - JpegHuffmanTable.LookupBits)];
        if (entry != 0)
        {
            Consume(entry >> 8);
            return entry & 0xFF;
        }

        for (int length = JpegHuffmanTable.LookupBits + 1; length <= 16; length++)
        {
            int code = (int)(_bits >> (32 - length));
            if (code <= table.MaxCode[length])
            {
                Consume(length);
                return table.Symbols[table.SymbolOffset[length] + code];
            }
        }

        throw Corrupt("the entropy-coded data holds an invalid Huffman code");
    }

    private int ReadBits(int count)
    {
        if (count == 0)
        {
            return 0;
        }

        if (_bitCount < count)
        {
            FillBits();
        }

        int value = (int)(_bits >> (32 - count));
        Consume(count);
        return value;
    }

    private void Consume(int count)
    {
        _bits <<= count;
        _bitCount -= count;
    }

    /// <summary>Tops the bit buffer up to at least 25 bits: unstuffs FF 00, and feeds zeros at a marker or past the end.</summary>
    private void FillBits()
    {
        while (_bitCount <= 24)
        {
            uint next = 0;
            if (_hitMarker)
            {
                // libjpeg also decodes the remainder of a scan cut short by a marker from zero bits.
            }
            else if (_position >= _data.Length)
            {
                _bytesPastEnd++;
            }
            else if (_data[_position] != 0xFF)
            {
                next = _data[_position++];
            }
            else if (_position + 1 < _data.Length && _data[_position + 1] == 0)
            {
                next = 0xFF;
                _position += 2;
            }
            else if (_position + 1 >= _data.Length)
            {
                _position = _data.Length;
                _bytesPastEnd++;
            }
            else
            {
                _hitMarker = true; // left in place for the marker parser
            }

            _bits |= next << (24 - _bitCount);
            _bitCount += 8;
        }
    }

    /// <summary>Finds the next marker at or after the current position (skipping garbage and fill bytes): its code, or -1 at the end.</summary>
    private int NextMarker()
    {
        SkipToMarker();
        if (_position + 1 >= _data.Length)
        {
            _position = _data.Length;
            return -1;
        }

        int marker = _data[_position + 1];
        _position += 2;
        return marker;
    }

    private void SkipToMarker()
    {
        while (_position + 1 < _data.Length
            && !(_data[_position] == 0xFF && _data[_position + 1] != 0 && _data[_position + 1] != 0xFF))
        {
            _position++;
        }
    }

    /// <summary>Returns the payload of a length-prefixed marker segment and moves past it.</summary>
    private ReadOnlySpan<byte> ReadSegment()
    {
        if (_position + 2 > _data.Length)
        {
            throw Corrupt("the data ends inside a marker segment (truncated file)");
        }

        int length = _data[_position] << 8 | _data[_position + 1];
        if (length < 2)
        {
            throw Corrupt("a marker segment has a length below 2");
        }

        if (_position + length > _data.Length)
        {
            throw Corrupt("the data ends inside a marker segment (truncated file)");
        }

        var segment = new ReadOnlySpan<byte>(_data, _position + 2, length - 2);
        _position += length;
        return segment;
    }

    /// <summary>Inverse DCT of every component, then upsampling and colour conversion row by row.</summary>
    private RgbImage Output()
    {
        Component[] components = _components!;
        foreach (Component component in components)
        {
            int[] quantization = _quantizationTables[component.QuantizationTable]
                ?? throw Corrupt($"quantization table {component.QuantizationTable} is used but never defined");
            int stride = component.BlocksPerLine * 8;
            component.Samples = new byte[checked(stride * component.UsedBlocksPerColumn * 8)];
            for (int blockRow = 0; blockRow < component.UsedBlocksPerColumn; blockRow++)
            {
                for (int blockColumn = 0; blockColumn < component.UsedBlocksPerLine; blockColumn++)
                {
                    JpegIdct.Transform(
                        component.Coefficients.AsSpan((blockRow * component.BlocksPerLine + blockColumn) * 64, 64),
                        quantization,
                        component.Samples.AsSpan(blockRow * 8 * stride + blockColumn * 8),
                        stride);
                }
            }

            component.Coefficients = [];
        }

        var pixels = new byte[checked(_width * _height * 3)];
        if (components.Length == 1)
        {
            Component grey = components[0];
            Span<byte> row = new byte[_width];
            for (int y = 0; y < _height; y++)
            {
                JpegUpsampler.UpsampleRow(grey, _maxH, _maxV, y, row);
                Span<byte> output = pixels.AsSpan(y * _width * 3, _width * 3);
                for (int x = 0; x < _width; x++)
                {
                    output[3 * x] = output[3 * x + 1] = output[3 * x + 2] = row[x];
                }
            }

            return new RgbImage(_width, _height, pixels);
        }

        bool isRgb = _sawJfif ? false
            : _sawAdobe ? _adobeTransform == 0
            : components[0].Id == 'R' && components[1].Id == 'G' && components[2].Id == 'B';
        var planes = new byte[3][];
        for (int c = 0; c < 3; c++)
        {
            planes[c] = new byte[_width];
        }

        for (int y = 0; y < _height; y++)
        {
            for (int c = 0; c < 3; c++)
            {
                JpegUpsampler.UpsampleRow(components[c], _maxH, _maxV, y, planes[c]);
            }

            Span<byte> output = pixels.AsSpan(y * _width * 3, _width * 3);
            if (isRgb)
            {
                for (int x = 0; x < _width; x++)
                {
                    output[3 * x] = planes[0][x];
                    output[3 * x + 1] = planes[1][x];
                    output[3 * x + 2] = planes[2][x];
                }
            }
            else
            {
                JpegUpsampler.YCbCrToRgb(planes[0], planes[1], planes[2], output);
            }
        }

        return new RgbImage(_width, _height, pixels);
    }

    private static int Extend(int value, int size) => value < 1 << (size - 1) ? value - (1 << size) + 1 : value;

    private static int DivideRoundingUp(int numerator, int denominator) => (numerator + denominator - 1) / denominator;

    private static InvalidDataException Corrupt(string reason) => new(reason);

    /// <summary>One colour component of the frame: its sampling, its coefficients, then its decoded samples.</summary>
    internal sealed class Component(int id, int h, int v, int quantizationTable)
    {
        public int Id { get; } = id;
        public int H { get; } = h;
        public int V { get; } = v;
        public int QuantizationTable { get; } = quantizationTable;
        public int DcTable { get; set; }
        public int AcTable { get; set; }
        public int DcPrediction { get; set; }

        /// <summary>Samples per line and lines at this component's resolution (libjpeg's downsampled_width/height).</summary>
        public int Width { get; set; }
        public int Height { get; set; }

        /// <summary>Blocks that hold samples, and blocks stored (whole MCUs).</summary>
        public int UsedBlocksPerLine { get; set; }
        public int UsedBlocksPerColumn { get; set; }
        public int BlocksPerLine { get; set; }
        public int BlocksPerColumn { get; set; }

        public short[] Coefficients { get; set; } = [];

        /// <summary>Decoded samples, BlocksPerLine * 8 per row.</summary>
        public byte[] Samples { get; set; } = [];

        public int SampleStride => BlocksPerLine * 8;
    }
}
